"""GGUF export (`stepflash convert CKPT OUT.gguf`): read back with the `gguf` reader, and run in llama.cpp.

The llama.cpp tests use llama-cpp-python (built from source by `make install`, pinned in the `test` extra);
they are skipped only when it is not installed and CI is not set.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import stepflash
from stepflash.chat import ChatTemplate
from stepflash.checkpoint.gguf import gguf_name, read_metadata
from stepflash.cli import main
from stepflash.config import Step35Config, tiny
from stepflash.tokenizer import load_tokenizer, train_tokenizer

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "def main():\n    print('hello, world')  # 42\n",
    "Hello  world\t\ttabs and   spaces\n\n\nnewlines   ",
    "Ünïcödé façade — naïve café, 東京 123 4567 89.5 %",
    "it's they're we've I'll you'd 'quoted' \"double\" $x=y+z; a[i]->b",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "  leading spaces, trailing tab\t",
]


def corpus() -> list[str]:
    return [t * 3 for t in TEXTS] * 20 + [
        "the quick brown fox jumps over the lazy dog " * 5, "for i in range(10):\n    total += i * i\n"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with every feature on (MTP, clamps, llama3 rope, sliding window smaller than the
    prompts) and random values everywhere, norms and router bias included, so nothing is a no-op."""
    path = str(tmp_path_factory.mktemp("ckpt"))
    tok = train_tokenizer(corpus(), 384)
    cfg = tiny().replace(vocab_size=384)
    stepflash.save_model(stepflash.Step35ForCausalLM(cfg), path, tokenizer=tok)
    gen = torch.Generator().manual_seed(0)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    for name, t in tensors.items():  # release names, read from the file: independent of the model's modules
        std = 0.3 if name.endswith("norm.weight") else 0.05 if name.endswith("router_bias") else \
            0.5 if name.endswith(("lm_head.weight", "shared_head.output.weight")) else 0.15
        tensors[name] = (torch.randn(t.shape, generator=gen) * std).to(t.dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        paths[dtype] = str(out / f"model-{dtype}.gguf")
        assert main(["convert", checkpoint, paths[dtype], "--dtype", dtype]) == 0
    return paths


def _stored(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _llama3_factors(theta, rotary_dim, scaling):
    """SPEC section 2's llama3 rule, one frequency at a time: the divisor applied to each inverse frequency."""
    f, lo, hi, ctx = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings"))
    out = []
    for j in range(rotary_dim // 2):
        inv = theta ** (-2 * j / rotary_dim)
        lam = 2 * math.pi / inv
        if lam < ctx / hi:
            out.append(1.0)
        elif lam > ctx / lo:
            out.append(f)
        else:
            s = (ctx / lam - lo) / (hi - lo)
            out.append(1.0 / ((1 - s) / f + s))
    return out


def test_every_tensor_reads_back_equal_to_the_checkpoint(checkpoint, exported):
    cfg = Step35Config.from_json(checkpoint)
    stored = _stored(checkpoint)
    reader = gguf.GGUFReader(exported["f32"])
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == len(stored) + 1  # + rope_freqs
    for name, t in stored.items():
        _, out_name = gguf_name(name)
        rt = by_name[out_name]
        got = gguf.dequantize(rt.data, rt.tensor_type).reshape(tuple(reversed(rt.shape.tolist())))
        want = t.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)  # zero-centred -> 1 + w
        assert rt.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(got, want, err_msg=name)
    freqs = by_name["rope_freqs.weight"].data
    expected = _llama3_factors(5e6, cfg.rotary_dim(0), cfg.rope_scaling)
    expected += [1.0] * (cfg.head_dim // 2 - len(expected))  # sliding layers use all dims, unscaled
    np.testing.assert_allclose(freqs, expected, rtol=1e-6)
    assert any(abs(x - 1) > 0.1 for x in expected)  # the scaling is not a no-op at this size


@pytest.mark.parametrize("dtype, tol", [("f16", 2 ** -11), ("bf16", 2 ** -8), ("q8_0", 1 / 127)])
def test_quantized_tensors_within_their_format(checkpoint, exported, dtype, tol):
    stored = _stored(checkpoint)
    reader = gguf.GGUFReader(exported[dtype])
    by_name = {t.name: t for t in reader.tensors}
    kinds = set()
    for name, t in stored.items():
        _, out_name = gguf_name(name)
        rt = by_name[out_name]
        got = gguf.dequantize(rt.data, rt.tensor_type).reshape(tuple(reversed(rt.shape.tolist())))
        want = t.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        kinds.add(rt.tensor_type.name)
        if t.dim() == 1 or name.endswith(("norm.weight", "moe.gate.weight")):  # vectors, norms, router: F32
            assert rt.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            scale = np.abs(want).max(axis=-1, keepdims=True)  # per row (q8_0 blocks are finer still)
            assert (np.abs(got - want) <= tol * scale + 1e-12).all(), name
    assert dtype.upper() in kinds


def test_metadata_states_every_hyperparameter(checkpoint, exported):
    cfg = Step35Config.from_json(checkpoint)
    md = read_metadata(exported["f32"])
    n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert md["general.architecture"] == "step35"
    assert md["step35.block_count"] == n and md["step35.nextn_predict_layers"] == 3
    assert md["step35.attention.head_count"] == [cfg.num_heads(i) for i in range(n)] == [4, 8, 8, 8, 8, 8, 8]
    assert md["step35.attention.sliding_window_pattern"] == [False] + [True] * 6
    assert md["step35.rope.freq_base"] == 5e6 and md["step35.rope.freq_base_swa"] == 1e4
    assert md["step35.expert_weights_norm"] is True and md["step35.expert_weights_scale"] == 3.0
    assert md["step35.expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID.value
    assert md["step35.swiglu_clamp_exp"][3] == 7.0 and md["step35.swiglu_clamp_shexp"][3] == 16.0
    assert md["step35.leading_dense_block_count"] == 1 and md["step35.context_length"] == 512
    assert md["tokenizer.ggml.pre"] == "gpt-2" and md["tokenizer.ggml.eot_token_id"] == 4
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert tokens[:5] == ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"] and len(tokens) == 384
    assert types[:11] == [gguf.TokenType.CONTROL] * 11 and types[11] == gguf.TokenType.NORMAL
    assert md["tokenizer.chat_template"] == ChatTemplate.from_checkpoint(checkpoint).source


def test_dcp_checkpoint_converts_to_the_same_tensors(checkpoint, exported, tmp_path):
    dcp_dir = str(tmp_path / "dcp")
    assert main(["convert", checkpoint, dcp_dir]) == 0
    out = str(tmp_path / "from-dcp.gguf")
    assert main(["convert", dcp_dir, out, "--dtype", "f32"]) == 0
    a, b = gguf.GGUFReader(exported["f32"]), gguf.GGUFReader(out)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        np.testing.assert_array_equal(ta.data, tb.data, err_msg=ta.name)


def _edit_tokenizer(path, fn):
    p = os.path.join(path, "tokenizer.json")
    spec = json.load(open(p))
    fn(spec)
    json.dump(spec, open(p, "w"))


def test_refusals_are_one_line(checkpoint, tmp_path, capsys):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(checkpoint, bad)
    _edit_tokenizer(bad, lambda s: s.__setitem__("pre_tokenizer", {"type": "Whitespace"}))
    assert main(["convert", bad, str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not GPT-2's byte-level regex" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "a.gguf") and not os.path.exists(tmp_path / "a.gguf.tmp")
    assert main(["convert", bad, str(tmp_path / "a.gguf"), "--tokenizer-pre", "llama-bpe"]) == 0  # named by the user
    assert read_metadata(str(tmp_path / "a.gguf"))["tokenizer.ggml.pre"] == "llama-bpe"
    os.remove(os.path.join(bad, "tokenizer.json"))
    assert main(["convert", bad, str(tmp_path / "b.gguf")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    cfg = json.load(open(os.path.join(checkpoint, "config.json")))
    cfg["partial_rotary_factors"] = [1.0] * len(cfg["partial_rotary_factors"])
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    shutil.copy(os.path.join(checkpoint, "tokenizer.json"), bad)
    assert main(["convert", bad, str(tmp_path / "c.gguf")]) == 2
    assert "partial_rotary_factors 0.5 on full" in capsys.readouterr().err
    assert main(["convert", checkpoint, str(tmp_path / "a.gguf")]) == 2  # exists
    assert main(["convert", checkpoint, str(tmp_path / "d.gguf"), "--dtype", "q4_0"]) == 2
    assert "q4_0" in capsys.readouterr().err


# ---- llama.cpp itself --------------------------------------------------------------------------------------

def _llama_cpp():
    if os.environ.get("CI"):
        import llama_cpp  # CI installs it (the `test` extra): a missing build must fail, not skip

        return llama_cpp
    return pytest.importorskip("llama_cpp")


def _load(path, n_ctx=128, repack=True):
    """llama.cpp with an f32 KV cache (its default is f16, a rounding stepflash's f32 cache does not have).
    repack=False keeps weights in plain CPU buffers: on this machine llama.cpp's AMX repacking of q8_0
    weights segfaults (docs/gguf.md), whatever the model."""
    llama_cpp = _llama_cpp()
    f32 = llama_cpp.GGML_TYPE_F32
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = repack
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params  # read once, by Llama.__init__
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, n_threads_batch=1,
                               logits_all=True, type_k=f32, type_v=f32, verbose=False)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = default_params


def _teacher_forced(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])  # [T, vocab]


def _prompt(checkpoint):
    tok = load_tokenizer(checkpoint)
    return tok.encode(TEXTS[0] + TEXTS[2] + TEXTS[4]).ids  # longer than the sliding window (8)


def test_llama_cpp_tokenizes_like_stepflash(checkpoint, exported):
    tok = load_tokenizer(checkpoint)
    llm = _load(exported["f32"])
    chat = ChatTemplate.from_checkpoint(checkpoint).render(
        [{"role": "user", "content": "Write  a\tpoem,  please!"}])
    for text in TEXTS + [chat, "x", " ", "\n\n", "a\n\nb  c", "😀 emoji 🚀🚀", "3.14159 1e-5 0x1F"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text).ids, repr(text)
        assert llm.detokenize(tok.encode(text).ids, special=True).decode() == tok.decode(tok.encode(text).ids,
                                                                                         skip_special_tokens=False)


def test_llama_cpp_logits_and_greedy_tokens_equal_stepflash(checkpoint, exported):
    model = stepflash.load_model(checkpoint, dtype=torch.float32).eval()
    ids = _prompt(checkpoint)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()  # [T, vocab]
    theirs = _teacher_forced(_load(exported["f32"]), ids)
    scale = np.abs(ours).max()
    assert scale > 1.0  # logits far from zero: a wrong model cannot pass by accident
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=3e-5 * scale)  # measured: 2e-6 * scale
    # Greedy continuation: llama.cpp's own sampler (temperature 0) against argmax of stepflash's forward.
    llm = _load(exported["f32"])
    got = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        got.append(t)
        if len(got) == 24:
            break
    want, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(24):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
    assert got == want
    # f16 is a rounding of the same model: the same top-1 almost everywhere (measured 100%). bf16 and q8_0
    # round harder and, with random weights, flip expert choices (measured 92% and 84%): a smoke test that
    # llama.cpp reads those formats as written (a misread tensor agrees on ~1/384 of positions).
    for dtype, least in (("f16", 0.95), ("bf16", 0.6), ("q8_0", 0.6)):
        quantized = _teacher_forced(_load(exported[dtype], repack=dtype != "q8_0"), ids)
        assert (quantized.argmax(-1) == ours.argmax(-1)).mean() >= least, dtype


def test_without_renormalisation_llama_cpp_is_a_different_model(checkpoint, tmp_path, monkeypatch):
    """Negative control for the logits test: the GGUF with `expert_weights_norm` false (what llama.cpp assumes
    when a config.json omits norm_expert_weight) gives logits far outside the tolerance."""
    import gguf as gguf_package

    real = gguf_package.GGUFWriter.add_expert_weights_norm
    monkeypatch.setattr(gguf_package.GGUFWriter, "add_expert_weights_norm", lambda self, value: real(self, False))
    out = str(tmp_path / "no-norm.gguf")
    assert main(["convert", checkpoint, out, "--dtype", "f32"]) == 0
    model = stepflash.load_model(checkpoint, dtype=torch.float32).eval()
    ids = _prompt(checkpoint)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = _teacher_forced(_load(out), ids)
    assert np.abs(theirs - ours).max() > 100 * 1e-4 * np.abs(ours).max()
