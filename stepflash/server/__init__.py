"""OpenAI-compatible HTTP server: `create_app(engine, tokenizer, model_name)` and the `serve` verb (app.py)."""

from stepflash.server.app import ServeArgs, create_app, run

__all__ = ["ServeArgs", "create_app", "run"]
