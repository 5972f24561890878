"""The training core every verb shares (`stepflash.training`: schedule, losses, batches, StepLog, Runtime in one
process), each against the formula or a naive loop written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from stepflash.distributed import Runtime
from stepflash.errors import UserError
from stepflash.training.batches import ShuffledBatches, pad_right, read_jsonl
from stepflash.training.losses import (cross_entropy, logprobs_and_entropy, masked_cross_entropy, masked_mean,
                                       token_logprobs)
from stepflash.training.monitors import StepLog
from stepflash.training.schedule import lr_factor, set_lr


def test_lr_factor_warmup_then_cosine_or_linear():
    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1) and lr_factor(99, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, 0.1, decay="linear") == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(5, 10, 3, 0.1) == pytest.approx(0.6)  # a run shorter than its warmup stays in it


def test_set_lr_scales_every_group_from_its_own_peak():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w], "lr": 1e-3}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-1}])
    set_lr(opt, 0.5)
    set_lr(opt, 0.25)  # from the peak, not from the last value
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 2.5e-2])


def test_masked_losses_match_a_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    terms = [-torch.log_softmax(logits[b, t].float(), -1)[targets[b, t]] for b in range(2) for t in range(5) if mask[b, t]]
    assert masked_cross_entropy(logits, targets, mask).item() == pytest.approx(sum(terms).item() / len(terms), rel=1e-6)
    assert cross_entropy(logits, targets).item() == pytest.approx(
        F.cross_entropy(logits.float().reshape(-1, 11), targets.reshape(-1)).item(), rel=1e-6)
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0  # nothing masked in: 0, not NaN
    lp, ent = logprobs_and_entropy(logits, targets)
    assert torch.equal(lp, token_logprobs(logits, targets))
    p = torch.softmax(logits[1, 2].float(), -1)
    assert lp[1, 2].item() == pytest.approx(torch.log(p[targets[1, 2]]).item(), rel=1e-5)
    assert ent[1, 2].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)


def test_pad_right_and_shuffled_batches():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0, flags=[[0, 1, 1], [1]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert pad_right([[1], [2, 3]], 9)[1].tolist() == [[1, 0], [1, 1]]
    sampler = ShuffledBatches(10, 4, seed=3)
    drawn = [sampler.next() for _ in range(5)]  # 20 draws = two passes over the 10 examples
    flat = sum(drawn, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    resumed = ShuffledBatches(10, 4, seed=3)
    resumed.load_state_dict(ShuffledBatches(10, 4, seed=3).state_dict() | {"drawn": 3})
    assert [resumed.next() for _ in range(2)] == drawn[3:]
    with pytest.raises(UserError, match="no examples"):
        ShuffledBatches(0, 4)


def test_read_jsonl_errors_are_one_line(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(str(good)) == [(1, {"a": 1}), (3, {"a": 2})]
    cases = {"missing.jsonl": None, "bad.jsonl": '{"a": 1}\n{nope\n', "list.jsonl": "[1, 2]\n", "empty.jsonl": "\n",
             "latin.jsonl": b'{"a": "\xff"}\n'}
    for name, text in cases.items():
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        with pytest.raises(UserError) as e:
            read_jsonl(str(path), "pairs")
        assert "\n" not in str(e.value) and name in str(e.value), str(e.value)
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(str(tmp_path / "bad.jsonl"))


def test_step_log_prints_means_since_the_last_line():
    lines = []
    log = StepLog("sft", 6, 3, log=lines.append)
    for step, loss in enumerate([3.0, 2.0, 1.0, 0.5, 0.5, 0.5], 1):
        log.add(step, {"loss": loss})
    assert [line.split(" (")[0] for line in lines] == ["sft step 3/6 loss 2.0000", "sft step 6/6 loss 0.5000"]
    assert log.mean(2) == {"loss": 0.5} and len(log.history) == 6
    quiet = StepLog("x", 2, 1, log=lines.append, enabled=False)
    quiet.add(1, {"loss": 1.0})
    assert len(lines) == 2


def test_one_process_runtime_collectives_are_the_identity():
    rt = Runtime()
    t = torch.tensor([1.5, 2.0])
    assert rt.all_reduce(t) is t and t.tolist() == [1.5, 2.0]
    assert rt.mean(3.0) == 3.0 and rt.max(2.0) == 2.0 and rt.any(True) and not rt.any(False)
    assert rt.all_gather(t) is t and rt.span(7) == (0, 7) and rt.token_weight(torch.tensor(5.0)) == 1.0
    model = torch.nn.Linear(2, 2)
    assert rt.replicate(model) is model and rt.gather_model(model) is model
    model(torch.ones(1, 2)).sum().backward()
    norm = rt.clip_grad_norm(model, 0.0)  # 0: measure only
    assert norm.item() == pytest.approx(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item())
