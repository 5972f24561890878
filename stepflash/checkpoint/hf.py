"""Name mapping between the release layout and transformers' native Step 3.5 text model.

transformers (`models/step3p7`, text `model_type: step3p5`) stores the router bias as
`mlp.gate.e_score_correction_bias`, fuses the routed experts as `mlp.experts.gate_up_proj`
([E, 2*inter, hidden], gate rows first), puts the shared expert under `mlp.shared_experts` and drops
the `model.` prefix inside the base model. These functions convert whole state dicts both ways;
they need no transformers import.
"""

from __future__ import annotations

import re

import torch

_RENAMES = [  # (release, transformers), applied to the part after `layers.{i}.`
    ("moe.gate.weight", "mlp.gate.weight"),
    ("moe.router_bias", "mlp.gate.e_score_correction_bias"),
    ("moe.down_proj.weight", "mlp.experts.down_proj"),
    ("share_expert.", "mlp.shared_experts."),
]


def hf_to_release(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers `Step3p7TextModel` state dict (+ optional `lm_head.weight`) -> release names.
    Only trunk layers exist on the transformers side; MTP layers are not part of its text model."""
    out = {}
    for name, t in state.items():
        name = name.removeprefix("model.")
        if name == "lm_head.weight":
            out[name] = t
            continue
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m and int(m.group(1)) < num_layers:
            rest = m.group(2)
            if rest == "mlp.experts.gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                out[f"model.layers.{m.group(1)}.moe.gate_proj.weight"] = gate.contiguous()
                out[f"model.layers.{m.group(1)}.moe.up_proj.weight"] = up.contiguous()
                continue
            for rel, hf in _RENAMES:
                if rest.startswith(hf):
                    rest = rel + rest[len(hf):]
                    break
            name = f"layers.{m.group(1)}.{rest}"
        out["model." + name] = t
    return out


def release_to_hf(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Release names -> transformers `Step3p7TextModel` names (+ `lm_head.weight`); MTP layers dropped."""
    out, gate_up = {}, {}
    for name, t in state.items():
        if name == "lm_head.weight":
            out[name] = t
            continue
        name = name.removeprefix("model.")
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= num_layers:
                continue
            if rest in ("moe.gate_proj.weight", "moe.up_proj.weight"):
                gate_up.setdefault(i, {})[rest.split(".")[1]] = t
                continue
            for rel, hf in _RENAMES:
                if rest.startswith(rel):
                    rest = hf + rest[len(rel):]
                    break
            name = f"layers.{i}.{rest}"
        out[name] = t
    for i, parts in gate_up.items():
        out[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=1)
    return out
