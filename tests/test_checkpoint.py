import json
import os
import resource

import pytest
import torch
from safetensors.torch import load_file, save_file

import stepflash
from stepflash.checkpoint import CheckpointError, parse_size
from stepflash.config import flash


def test_round_trip_single_and_sharded(tmp_path, tiny_config):
    model = stepflash.Step35ForCausalLM(tiny_config)
    with torch.no_grad():
        for layer in model.moe_modules:
            layer.router_bias.normal_()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 12))
    ref = model(ids)
    for sub, shard in (("single", "5GB"), ("sharded", "100KB")):
        path = str(tmp_path / sub)
        stepflash.save_model(model, path, max_shard_size=shard)
        loaded = stepflash.load_model(path)
        torch.testing.assert_close(loaded(ids), ref, atol=0, rtol=0)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert "model.layers.4.transformer.shared_head.output.weight" in index["weight_map"]  # MTP layer 4 = L + 0


def test_bf16_load_keeps_router_bias_fp32(tmp_path, tiny_config):
    model = stepflash.Step35ForCausalLM(tiny_config)
    stepflash.save_model(model, str(tmp_path), dtype=torch.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    loaded = stepflash.load_model(str(tmp_path))
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].moe.router_bias.dtype == torch.float32
    logits = loaded(torch.randint(0, 256, (1, 5)))
    assert torch.isfinite(logits.float()).all()


def _rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_errors_name_the_tensor(tmp_path, tiny_config):
    model = stepflash.Step35ForCausalLM(tiny_config)
    path = str(tmp_path)
    stepflash.save_model(model, path)
    _rewrite(path, lambda t: t.pop("model.layers.2.moe.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.moe\.up_proj\.weight.*missing"):
        stepflash.load_model(path)
    stepflash.save_model(model, path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight: checkpoint shape \[3, 3\] but the config expects \[64, 64\]"):
        stepflash.load_model(path)
    stepflash.save_model(model, path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.9.foo.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.9\.foo\.weight"):
        stepflash.load_model(path)
    with pytest.raises(FileNotFoundError):
        stepflash.load_model(str(tmp_path / "nope"))


def test_flash_on_meta_takes_no_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = stepflash.Step35ForCausalLM(flash())
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert model.lm_head.weight.is_meta
    assert grown_mib < 200  # 199B parameters would be ~400 GB in bf16


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_saved_model_has_what_peers_read(tmp_path, tiny_config):
    """generation_config.json stops where `stepflash serve` stops; the tokenizer goes beside the weights."""
    from tokenizers import Tokenizer

    from stepflash.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world"] * 20, 64)
    model = stepflash.Step35ForCausalLM(tiny_config)
    stepflash.save_model(model, str(tmp_path / "with"), tokenizer=tok)
    files = set(os.listdir(tmp_path / "with"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    gen = json.load(open(tmp_path / "with" / "generation_config.json"))
    assert gen == {"bos_token_id": 0, "eos_token_id": [1, tok.token_to_id("<|im_end|>")],
                   "pad_token_id": tok.token_to_id("<|pad|>")}
    assert Tokenizer.from_file(str(tmp_path / "with" / "tokenizer.json")).get_vocab() == tok.get_vocab()
    config = json.load(open(tmp_path / "with" / "config.json"))
    assert config["norm_expert_weight"] is True and config["max_seq_len"] == config["max_position_embeddings"]
    # Without a tokenizer: no tokenizer files, eos ids from the config only. A tokenizer given as a path is copied.
    stepflash.save_model(model, str(tmp_path / "without"))
    assert "tokenizer.json" not in os.listdir(tmp_path / "without")
    assert json.load(open(tmp_path / "without" / "generation_config.json"))["eos_token_id"] == [1]
    stepflash.save_model(model, str(tmp_path / "copied"), tokenizer=str(tmp_path / "with"))
    assert open(tmp_path / "copied" / "tokenizer.json").read() == open(tmp_path / "with" / "tokenizer.json").read()
