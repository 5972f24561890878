"""The model side of an eval: a checkpoint, its tokenizer and chat template, and the Engine, as one policy.

`CheckpointPolicy.complete(conversations)` renders each conversation with the checkpoint's chat
template (generation prompt on: the reply starts inside the think block), tokenizes it with the
checkpoint's tokenizer.json and generates every prompt in one batched `Engine.generate` call, stopping
at the model's EOS ids and `<|im_end|>`. The reply text is decoded with special tokens kept (so
`</think>` and `<tool_call>` survive for the parsers), minus the stop token that ended it.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from stepflash.chat import resolve_chat_template
from stepflash.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
END_TOKENS = ("<|im_end|>", "<|eos|>")



class CheckpointPolicy:
    def __init__(self, checkpoint: str, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, mtp: int = 0, batch_size: int = 8, device: str = "cpu",
                 dtype: str | None = None, chat_template: str = "auto"):
        from stepflash.checkpoint import load_model
        from stepflash.inference.engine import Engine
        from stepflash.tokenizer import load_tokenizer

        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise UserError(f"no checkpoint at {checkpoint} (expected a directory with config.json)")
        if dtype is not None and dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available")
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.tokenizer = load_tokenizer(checkpoint)
        self.template = resolve_chat_template(chat_template, checkpoint)
        model = load_model(checkpoint, dtype=DTYPES.get(dtype), device=device)
        self.engine = Engine(model, max_batch_size=batch_size)
        self.context = model.config.max_position_embeddings
        ends = [self.tokenizer.token_to_id(t) for t in END_TOKENS]
        self.stop_ids = sorted(set(model.config.eos_token_ids) | {i for i in ends if i is not None})
        self.sampling = dict(temperature=temperature, top_p=top_p, seed=seed, speculative_tokens=mtp)
        self.max_new_tokens = max_new_tokens
        self.generated_tokens = 0
        self.generation_s = 0.0
        self.seed_offset = 0  # later calls (tool turns) sample with fresh seeds
        self._warned_tools = False

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        from stepflash.chat import ChatFormatError

        try:
            text = self.template.render(messages, tools)
        except ChatFormatError as e:
            raise UserError(str(e)) from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def complete(self, prompts: list[list[int]]) -> list[str | None]:
        """Reply text for every prompt; None for a prompt that leaves no room in the context."""
        fits = [i for i, p in enumerate(prompts) if len(p) < self.context]
        replies: list[str | None] = [None] * len(prompts)
        if not fits:
            return replies
        longest = max(len(prompts[i]) for i in fits)
        max_new = min(self.max_new_tokens, self.context - longest)
        sampling = dict(self.sampling)
        if sampling["seed"] is not None:
            sampling["seed"] += self.seed_offset
        self.seed_offset += len(prompts)
        t0 = time.perf_counter()
        results = self.engine.generate([prompts[i] for i in fits], max_new, stop_token_ids=self.stop_ids, **sampling)
        self.generation_s += time.perf_counter() - t0
        for i, r in zip(fits, results):
            ids = r.token_ids[:-1] if r.finish_reason == "stop" and r.token_ids else r.token_ids
            self.generated_tokens += len(r.token_ids)
            replies[i] = self.tokenizer.decode(ids, skip_special_tokens=False)
        return replies

    def respond(self, episodes) -> list[str | None]:
        """The tool-episode policy: one reply per episode, all generated in one batch."""
        if not self._warned_tools and "tools" not in self.template.source:
            self._warned_tools = True
            print("stepflash eval: note: the chat template does not render tools, so the model is not shown them; "
                  "--chat-template builtin uses the Step 3.5 template", file=sys.stderr)
        return self.complete([self.encode(ep.messages, ep.tools) for ep in episodes])
