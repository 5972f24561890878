"""A scalar head on the model trunk: the RL critic (a value per token) and the base of the reward model.

`CriticModel(model)` reads the final-normed hidden state of every position and maps it to one number with
`ValueHead` (a zero-initialised linear layer, so a fresh critic predicts 0 everywhere). The value at
position p is the value of the state after reading tokens 0..p. For response token a_t at position p, the
state it was generated from ends at p - 1, so, exactly like log-probs:
    values = critic(ids)            # [B, S]
    v_t    = values[:, :-1]         # V(s_t) aligned with ids[:, 1:] (the tokens being scored)
and V(s_T) after the last response token is `values[:, last_response_position]`.

On disk: the base model in the release layout (`stepflash.save_model`, so the directory still loads as a
language model) plus `value_head.safetensors` with `weight` [1, hidden] and `bias` [1], kept in fp32.
The head runs in fp32 whatever the trunk's dtype.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from stepflash.model import Step35ForCausalLM

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., hidden] -> [...] in fp32."""
        return self.proj(h.float()).squeeze(-1)


class CriticModel(nn.Module):
    def __init__(self, model: Step35ForCausalLM):
        super().__init__()
        self.model = model
        self.value_head = ValueHead(model.config.hidden_size).to(next(model.parameters()).device)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, hidden]."""
        return self.model.model.norm(self.model.trunk(input_ids, position_ids))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> values [B, T] (fp32)."""
        return self.value_head(self.hidden(input_ids, position_ids))

    # ---- persistence (the files: stepflash.checkpoint.run) ------------------------------------------
    def save(self, path: str, max_shard_size: int | str = "5GB") -> None:
        from stepflash.checkpoint import save_model
        from stepflash.checkpoint.run import save_tensors

        save_model(self.model, path, max_shard_size=max_shard_size)
        save_tensors(path, VALUE_HEAD_FILE, {"weight": self.value_head.proj.weight, "bias": self.value_head.proj.bias})

    @classmethod
    def load(cls, path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             require_head: bool = True):
        """Base model plus value head from `path`. require_head=False starts a fresh (zero) head when the
        directory holds a plain language model (e.g. a critic initialised from the policy)."""
        from stepflash.checkpoint import load_model
        from stepflash.checkpoint.run import load_tensors

        head = load_tensors(path, VALUE_HEAD_FILE, device)
        if require_head and head is None:
            raise FileNotFoundError(f"no {VALUE_HEAD_FILE} in {path} (not a critic or reward model directory)")
        obj = cls(load_model(path, dtype=dtype, device=device))
        if head is not None:
            expected = tuple(obj.value_head.proj.weight.shape)
            if tuple(head["weight"].shape) != expected:
                raise ValueError(f"{os.path.join(path, VALUE_HEAD_FILE)}: weight shape {list(head['weight'].shape)} "
                                 f"does not match the model's hidden size (expected {list(expected)})")
            obj.value_head.proj.load_state_dict({"weight": head["weight"].float(), "bias": head["bias"].float()})
        return obj
