"""Checkpoints, one package: every format a model or a run is written in or read from.

- `release`: the release's own layout (config.json + safetensors, sharded with an index), `load_model` /
  `save_model`; what every other format converts to and from;
- `hf`: tensor-name mapping to and from transformers' native `step3p7` implementation;
- `dcp`: sharded model + optimizer state with torch.distributed.checkpoint, resumable at any world size;
- `run`: a training run's `checkpoints/step_N` directories, written atomically, with the trainer state;
- `gguf`, `gguf_vocab`: export to one GGUF file that llama.cpp (Ollama, LM Studio) runs as `step35`;
- `convert`: the `convert` verb between the formats.

`from stepflash.checkpoint import load_model, save_model` is the public API; the rest is imported from
its module.
"""

from stepflash.checkpoint.release import (INDEX_NAME, SINGLE_NAME, CheckpointError, load_model, parse_size,
                                          save_model)

__all__ = ["INDEX_NAME", "SINGLE_NAME", "CheckpointError", "load_model", "parse_size", "save_model"]
