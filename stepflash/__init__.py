"""stepflash: an open implementation of the Step 3.5 Flash system (model, inference, training, RL)."""

from stepflash.config import ConfigError, Step35Config
from stepflash.model import Step35ForCausalLM

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier pieces load on first use so `import stepflash` stays cheap.
    if name in ("load_model", "save_model"):
        from stepflash import checkpoint

        return getattr(checkpoint, name)
    if name == "Engine":
        from stepflash.inference.engine import Engine

        return Engine
    raise AttributeError(f"module 'stepflash' has no attribute {name!r}")


__all__ = ["ConfigError", "Engine", "Step35Config", "Step35ForCausalLM", "load_model", "save_model"]
