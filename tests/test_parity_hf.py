"""Parity with transformers' native Step 3.5 text model (`models/step3p7`), an implementation nobody here wrote.

Random tiny models are built there, every tensor (norms and router bias included) is randomised, the
weights are converted to the release layout, saved, loaded with `stepflash.load_model` and compared in
fp32 on sequences several times longer than the sliding window.
"""

import pytest
import torch

import stepflash
from stepflash.config import make_config
from stepflash.checkpoint.hf import hf_to_release, release_to_hf

step3p7 = pytest.importorskip("transformers.models.step3p7")


def hf_model(cfg):
    hf_cfg = step3p7.Step3p7TextConfig(**cfg.to_dict())
    hf_cfg._attn_implementation = "eager"
    model = step3p7.Step3p7TextModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.08)
        for layer in model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model


def mixed_config(**overrides):
    cfg = make_config(4, 64, full_heads=4, sliding_heads=8, kv_heads=2, head_dim=16, window=6, vocab=97,
                      inter=80, experts=8, top_k=3, moe_inter=24, dense_layers=1, max_pos=512, rope_original=16,
                      routed_limit=0.4, shared_limit=0.5)
    # Clamp every MoE layer (the small limits make the clamp bite) and keep the final norm's eps default.
    total = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    cfg = cfg.replace(swiglu_limits=[0.0, 0.4, 0.0, 0.4] + [0.0] * 3,
                      swiglu_limits_shared=[0.5, 0.0, 0.5, 0.0] + [0.0] * 3, moe_router_scaling_factor=2.5)
    assert len(cfg.swiglu_limits) == total
    return cfg.replace(**overrides)


def load_from_hf(model, cfg, tmp_path):
    lm_head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.1
    state = hf_to_release({**model.state_dict(), "lm_head.weight": lm_head}, cfg.num_hidden_layers)
    ours = stepflash.Step35ForCausalLM(cfg)
    # MTP layers do not exist in transformers' text model: keep ours random, copy the trunk over.
    full = {k: v for k, v in ours.state_dict().items()}
    full.update(state)
    ours.load_state_dict(full)
    stepflash.save_model(ours, str(tmp_path))
    return stepflash.load_model(str(tmp_path)), lm_head


@pytest.mark.parametrize("seq", [5, 23])
def test_hidden_states_and_logits_match(tmp_path, seq):
    cfg = mixed_config()
    hf = hf_model(cfg)
    ours, lm_head = load_from_hf(hf, cfg, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, seq))
    with torch.no_grad():
        ref_h = hf(ids).last_hidden_state
        got_h = ours.model.norm(ours.trunk(ids))
        torch.testing.assert_close(got_h, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids), ref_h @ lm_head.T, atol=1e-5, rtol=1e-5)


def test_sensitive_to_each_detail(tmp_path):
    """The comparison above would notice a wrong gate, norm, RoPE or router detail."""
    cfg = mixed_config()
    hf = hf_model(cfg)
    ours, _ = load_from_hf(hf, cfg, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        ref = hf(ids).last_hidden_state

        def differs():
            return (ours.model.norm(ours.trunk(ids)) - ref).abs().max().item() > 1e-3

        assert not differs()
        attn = ours.model.layers[1].self_attn
        attn.use_gate = False
        assert differs(), "head-wise gate"
        attn.use_gate = True
        moe = ours.model.layers[2].moe
        moe.router_bias.zero_()
        assert differs(), "router bias"
        moe.router_bias.copy_(hf.layers[2].mlp.gate.e_score_correction_bias)
        moe.scaling = 1.0
        assert differs(), "router scaling factor"
        moe.scaling = cfg.moe_router_scaling_factor
        clamped = ours.model.layers[3].moe
        clamped.limit = 0.0
        assert differs(), "swiglu clamp"
        clamped.limit = 0.4
        ours.rotary[ours.rope_of[0]].scaling = None
        ours.rotary[ours.rope_of[0]]._inv_freq = None
        assert differs(), "llama3 scaling on full layers"
        ours.rotary[ours.rope_of[0]].scaling = cfg.rope_scaling
        ours.rotary[ours.rope_of[0]]._inv_freq = None
        ours.model.layers[0].self_attn.sliding_window = cfg.sliding_window
        assert differs(), "full layer must not be windowed"
        ours.model.layers[0].self_attn.sliding_window = None
        assert not differs()


def test_round_trip_names(tmp_path):
    cfg = mixed_config()
    hf = hf_model(cfg)
    sd = hf.state_dict()
    back = release_to_hf(hf_to_release(sd, cfg.num_hidden_layers), cfg.num_hidden_layers)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
