import json

import pytest

from stepflash.config import ConfigError, Step35Config, flash, make_config, resolve_config, small, tiny


def test_flash_matches_release_values():
    c = flash()
    assert len(c.layer_types) == 48 and c.layer_types[44] == "full_attention" and c.layer_types[45:] == ["sliding_attention"] * 3
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == list(range(0, 45, 4))
    assert c.num_heads(0) == 64 and c.num_heads(1) == 96 and c.num_kv_heads(1) == 8
    assert c.rotary_dim(0) == 64 and c.rotary_dim(1) == 128
    assert c.rope_scaling_for(0)["factor"] == 2.0 and c.rope_scaling_for(1) is None
    assert c.moe_layers == set(range(3, 45)) and not c.is_moe(45)
    assert c.swiglu_limits[43] == c.swiglu_limits[44] == 7.0 and c.swiglu_limits_shared[44] == 16.0
    assert sum(c.swiglu_limits) == 14.0 and sum(c.swiglu_limits_shared) == 16.0


def test_release_json_round_trip(tmp_path):
    d = flash().to_dict()
    d["some_future_key"] = {"x": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    c = Step35Config.from_json(str(path))
    assert c.extra == {"some_future_key": {"x": 1}}
    assert c.to_dict() == d
    assert isinstance(c.to_dict()["moe_layers_enum"], str)


@pytest.mark.parametrize("change, field", [
    (dict(layer_types=["full_attention"] * 5), "layer_types"),
    (dict(num_attention_heads=5), "divisible"),
    (dict(moe_top_k=9), "moe_top_k"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(moe_layers_enum="1,2,9"), "moe_layers_enum"),
    (dict(moe_layers_enum="a,b"), "moe_layers_enum"),
    (dict(swiglu_limits=[0.0] * 3), "swiglu_limits"),
    (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling"),
    (dict(layer_types=["full_attention"] * 6 + ["local"]), "layer_types[6]"),
])
def test_contradictions_fail_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        tiny().replace(**change)


def test_presets_resolve_and_small_size():
    from stepflash.accounting import param_counts

    assert resolve_config("tiny") == tiny()
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_config("no-such-thing")
    n = param_counts(small())["total_params"]
    assert 20e6 <= n <= 60e6


def test_make_config_any_layer_count():
    c = make_config(6, 32, full_heads=2, sliding_heads=4, kv_heads=2, head_dim=8, window=4, vocab=50, inter=40,
                    experts=4, top_k=2, moe_inter=8, mtp=1)
    assert len(c.layer_types) == 7 and c.num_nextn_predict_layers == 1


# ---- what peers read from config.json ------------------------------------------------------------------
# How each peer reads a step3p5 config.json, keys absent included, written as data from their sources:
# vLLM `transformers_utils/configs/step3p5.py` (constructor defaults) and `model_executor/models/step3p5.py`
# (how the model uses them); llama.cpp `conversion/step3.py` + `conversion/base.py` (its converter) and
# `src/models/step35.cpp` (its loader), in the llama.cpp vendored by llama-cpp-python 0.3.36. docs/peers.md
# has the same facts as a table. Each function returns the model a peer would build, as comparable facts.

def _per_layer(value, n, default):
    if isinstance(value, list):
        return [float(v or 0.0) for v in value[:n]] + [default] * max(0, n - len(value))
    return [float(default if value is None else value)] * n


def _vllm_reading(d: dict) -> dict:
    n = d.get("num_hidden_layers", 48) + d.get("num_nextn_predict_layers", 0)
    types = d.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    window = d.get("sliding_window")
    yarn_only, scaling = d.get("yarn_only_types"), d.get("rope_scaling")
    mpe = d.get("max_position_embeddings")
    return {
        "renormalise": d.get("norm_expert_weight", True), "activation": d.get("moe_router_activation", "softmax"),
        "scaling": d.get("moe_router_scaling_factor", 1.0), "router_bias": d.get("use_moe_router_bias", True),
        "head_gate": d.get("use_head_wise_attn_gate", False),
        "sliding": [t == "sliding_attention" and window is not None for t in types],
        "rope_theta": _per_layer(d.get("rope_theta", 500000), n, 500000.0),
        "rotary_factor": _per_layer(d.get("partial_rotary_factors"), n, 1.0),
        "scaled_layers": [scaling is not None and (not yarn_only or types[i] in yarn_only) for i in range(n)],
        "clamp": _per_layer(d.get("swiglu_limits"), n, 0.0), "clamp_shared": _per_layer(d.get("swiglu_limits_shared"), n, 0.0),
        "context": min(d.get("max_seq_len", 4096), mpe or 1 << 62),  # vLLM takes the smallest length key
        "mtp": d.get("num_nextn_predict_layers", 0), "tied": d.get("tie_word_embeddings", True),
        "moe_layers": sorted(int(i) for i in d["moe_layers_enum"].split(",")) if "moe_layers_enum" in d
        else list(range(1, d.get("num_hidden_layers", 48))),
    }


def _llamacpp_reading(d: dict) -> dict:
    n = d["num_hidden_layers"] + d.get("num_nextn_predict_layers", 0)
    types = (d.get("layer_types") or [])[:n]
    types += ["full_attention"] * (n - len(types))  # the converter pads with full attention
    theta = d.get("rope_theta", 10000.0)
    # A list gives the full base from entry 0 and the sliding base from entry 1; a scalar leaves sliding at 1e4.
    full_base, swa_base = (theta[0], theta[1]) if isinstance(theta, list) else (theta, 10000.0)
    llama3 = (d.get("rope_scaling") or {}).get("rope_type") == "llama3"
    return {
        "renormalise": d.get("norm_expert_weight", False), "activation": d.get("moe_router_activation", "sigmoid"),
        "scaling": d.get("moe_router_scaling_factor", 1.0), "router_bias": True,  # exported whenever present
        "head_gate": True,  # used whenever g_proj is present
        "sliding": [t == "sliding_attention" for t in types],
        "rope_theta": [float(swa_base if t == "sliding_attention" else full_base) for t in types],
        "rotary_factor": [1.0 if t == "sliding_attention" else 0.5 for t in types],  # fixed in its graph
        "scaled_layers": [llama3 and t == "full_attention" for t in types],
        "clamp": _per_layer(d.get("swiglu_limits"), n, 0.0), "clamp_shared": _per_layer(d.get("swiglu_limits_shared"), n, 0.0),
        "context": d["max_position_embeddings"], "mtp": d.get("num_nextn_predict_layers", 0),
        "tied": False,  # output.weight is required
        "moe_layers": sorted(int(i) for i in d["moe_layers_enum"].split(",")),  # MoE-ness comes from the tensors
    }


def _stepflash_reading(c: Step35Config) -> dict:
    n = c.num_hidden_layers + c.num_nextn_predict_layers
    return {
        "renormalise": True, "activation": "sigmoid", "scaling": c.moe_router_scaling_factor,
        "router_bias": c.use_moe_router_bias, "head_gate": c.use_head_wise_attn_gate,
        "sliding": [c.is_sliding(i) for i in range(n)], "rope_theta": [float(t) for t in c.rope_theta],
        "rotary_factor": [float(f) for f in c.partial_rotary_factors],
        "scaled_layers": [c.rope_scaling_for(i) is not None for i in range(n)],
        "clamp": [float(x) for x in c.swiglu_limits], "clamp_shared": [float(x) for x in c.swiglu_limits_shared],
        "context": c.max_position_embeddings, "mtp": c.num_nextn_predict_layers, "tied": c.tie_word_embeddings,
        "moe_layers": sorted(c.moe_layers),
    }


@pytest.mark.parametrize("preset", ["flash", "small", "tiny"])
@pytest.mark.parametrize("peer", [_vllm_reading, _llamacpp_reading])
def test_every_peer_reads_the_preset_config_as_stepflash_does(preset, peer):
    cfg = resolve_config(preset)
    d = json.loads(json.dumps(cfg.to_dict()))  # exactly what config.json holds
    ours = _stepflash_reading(cfg)
    theirs = peer(d)
    assert {k: v for k, v in theirs.items() if v != ours[k]} == {}


@pytest.mark.parametrize("key, peer, fact", [
    ("norm_expert_weight", _llamacpp_reading, "renormalise"),  # the 372/512 top-1 mismatch of the issue
    ("max_seq_len", _vllm_reading, "context"),
    ("moe_router_activation", _vllm_reading, "activation"),
    ("moe_router_scaling_factor", _vllm_reading, "scaling"),
    ("use_head_wise_attn_gate", _vllm_reading, "head_gate"),
    ("yarn_only_types", _vllm_reading, "scaled_layers"),
    ("partial_rotary_factors", _vllm_reading, "rotary_factor"),
    ("layer_types", _llamacpp_reading, "sliding"),
    ("swiglu_limits", _vllm_reading, "clamp"),
])
def test_dropping_a_stated_key_changes_the_peers_model(key, peer, fact):
    """Negative control: each key the reading test relies on is one that matters when absent."""
    d = json.loads(json.dumps(flash().to_dict()))
    assert key in d
    del d[key]
    assert peer(d)[fact] != _stepflash_reading(flash())[fact]


def test_config_without_new_keys_keeps_todays_meaning(tmp_path):
    """A config.json written before norm_expert_weight / max_seq_len were stated (the release's too) loads as
    before and writes every original key back unchanged."""
    old = flash().to_dict()
    for key in ("norm_expert_weight", "max_seq_len"):
        old.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(old))
    c = Step35Config.from_json(str(tmp_path))
    assert c.norm_expert_weight is True and c.context_length == c.max_position_embeddings == 262144
    back = c.to_dict()
    assert {k: back[k] for k in old} == old
    assert back["norm_expert_weight"] is True and back["max_seq_len"] == 262144
    assert c == flash()


def test_max_seq_len_follows_max_position_embeddings_unless_set():
    c = Step35Config.from_dict(tiny().to_dict())
    assert c.max_seq_len is None and c.replace(max_position_embeddings=1024).to_dict()["max_seq_len"] == 1024
    shorter = Step35Config.from_dict({**tiny().to_dict(), "max_seq_len": 256})
    assert shorter.context_length == 256 and shorter.to_dict()["max_seq_len"] == 256
    with pytest.raises(ConfigError, match="max_seq_len"):
        tiny().replace(max_seq_len=10**6)
    with pytest.raises(ConfigError, match="norm_expert_weight"):
        tiny().replace(norm_expert_weight=False)
