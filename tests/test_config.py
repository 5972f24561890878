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
