"""Inference: KV cache (full + sliding ring), sampling, the batched engine, MTP speculative decoding and
the compiled decode step.

    from stepflash.inference import Engine, SamplingParams
    results = Engine(model, compile=True).generate([[1, 2, 3]], max_new_tokens=32, speculative_tokens=3)
"""

from stepflash.inference.engine import Engine, GenerationResult, SamplingParams, StepOutput

__all__ = ["Engine", "GenerationResult", "SamplingParams", "StepOutput"]
