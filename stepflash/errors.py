"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits with status 2."""

from stepflash.config import ConfigError  # noqa: F401  (re-exported: config errors are user errors too)


class UserError(Exception):
    """Bad input from the user: a wrong path, a flag out of range, a prompt longer than the context."""
