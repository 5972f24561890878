"""Inference: KV cache (full + sliding ring), sampling, the batched engine and MTP speculative decoding.

    from stepflash.inference import Engine, SamplingParams
    results = Engine(model).generate([[1, 2, 3]], max_new_tokens=32, speculative_tokens=3)
"""

from stepflash.inference.engine import Engine, GenerationResult, SamplingParams, StepOutput

__all__ = ["Engine", "GenerationResult", "SamplingParams", "StepOutput"]
