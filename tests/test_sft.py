"""SFT: the assistant-only loss mask against hand-written spans, the loss against a naive per-token sum, and a
short end-to-end run that lowers the loss and writes a loadable checkpoint + tokenizer."""

import json

import pytest
import torch
import torch.nn.functional as F

from stepflash.chat import render_chat
from stepflash.posttrain.sft import (SFTArgs, assistant_spans, build_task_tokenizer, encode_with_mask, sft_batch, sft_loss,
                              task_conversations, train_sft)

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "reasoning_content": "add them", "content": "Let me check.",
     "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "2+3"}}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "reasoning_content": "the tool said 5", "content": "\\boxed{5}"},
]
# What the model must produce in each assistant turn (SPEC section 8 layout: no newline before a tool
# call), written out by hand.
EXPECTED_ASSISTANT = [
    "<think>\nadd them\n</think>\nLet me check.<tool_call>\n<function=calc>\n<parameter=expr>\n2+3\n"
    "</parameter>\n</function>\n</tool_call><|im_end|>",
    "<think>\nthe tool said 5\n</think>\n\\boxed{5}<|im_end|>",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    texts = [render_chat(CONV, add_generation_prompt=False)] * 4 + \
        [render_chat(c["messages"], add_generation_prompt=False) for c in task_conversations("arithmetic", 50)]
    return build_task_tokenizer(texts, vocab_size=320)


def test_assistant_spans_cover_exactly_the_assistant_turns():
    text = render_chat(CONV, add_generation_prompt=False)
    assert [text[s:e] for s, e in assistant_spans(text)] == EXPECTED_ASSISTANT


def test_mask_selects_assistant_tokens_only(tok):
    text = render_chat(CONV, add_generation_prompt=False)
    ids, mask = encode_with_mask(tok, text)
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    context = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert trained == "".join(EXPECTED_ASSISTANT)
    for s in ("Be brief.", "What is 2+3?", "<tool_response>5</tool_response>", "<|im_start|>assistant\n"):
        assert s in context and s not in trained
    # The tool call and both reasoning blocks are trained on.
    assert "<tool_call>" in trained and "add them" in trained and "the tool said 5" in trained


def test_digits_are_single_tokens(tok):
    enc = tok.encode("Compute 4821 + 37.")
    assert [t for t in enc.tokens if t.isdigit()] == list("482137")
    assert tok.decode(enc.ids) == "Compute 4821 + 37."


def test_sft_loss_matches_naive_per_token_sum(tiny_config):
    from stepflash.model import Step35ForCausalLM

    model = Step35ForCausalLM(tiny_config)
    model.init_weights()
    model.float()
    examples = [([5, 9, 12, 7, 3], [0, 0, 1, 1, 1]), ([8, 2, 4], [0, 1, 1])]
    ids, mask = sft_batch(examples, pad_id=2)
    assert ids.shape == (2, 5) and mask.shape == (2, 4)
    loss = sft_loss(model, ids, mask)
    total, count = 0.0, 0
    for x, m in examples:  # naive: one sequence at a time, sum CE of every assistant target token
        logits = model(torch.tensor([x]))[0]
        for t in range(1, len(x)):
            if m[t]:
                total += F.cross_entropy(logits[t - 1:t].float(), torch.tensor([x[t]])).item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_sft_end_to_end_from_jsonl(tmp_path):
    from stepflash.checkpoint import load_model
    from stepflash.tokenizer import load_tokenizer

    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for c in task_conversations("arithmetic", 64, digits=(1, 1), ops="+", terms=(2, 2)):
            f.write(json.dumps(c) + "\n")
    out = tmp_path / "out"
    first = train_sft(SFTArgs("tiny", out=str(out), data=str(data), steps=1, batch_size=16, log_every=0, lr=3e-3))
    summary = train_sft(SFTArgs("tiny", out=str(out), data=str(data), steps=40, batch_size=16, log_every=0, lr=3e-3))
    assert summary["final_loss"] < 0.6 * first["final_loss"]
    model = load_model(str(out))
    tok = load_tokenizer(str(out))
    assert model.config.vocab_size == tok.get_vocab_size()
    assert set(model.config.eos_token_ids) == {tok.token_to_id("<|eos|>"), tok.token_to_id("<|im_end|>")}
    assert not (tmp_path / "out.tmp").exists()


def test_sft_cli_messages(tmp_path, capsys):
    """The help and the error name the same starting points; the closing line reports the last step's loss
    (the one the last progress line printed) and says which number is a mean."""
    from stepflash.cli import build_parser, main

    assert "tiny, small, flash, or demo" in " ".join(build_parser("sft", SFTArgs).format_help().split())
    assert main(["sft", "nope", "--task", "arithmetic", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(tiny, small, flash, or demo)" in err
    assert main(["sft", "tiny", "--task", "arithmetic", "--num-examples", "32", "--steps", "3", "--batch-size", "8",
                 "--max-len", "64", "--log-every", "1", "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()
    last_step = lines[-2].split(" loss ")[1].split()[0]
    assert lines[-2].startswith("sft step 3/3") and f"loss {last_step} at the last step" in lines[-1]
    assert "mean of the last 10" in lines[-1]
