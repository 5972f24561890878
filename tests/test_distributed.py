"""Sharded runs equal single-process runs: FSDP2 data parallel, expert parallel all-to-all, DCP resume.

Real processes on CPU with gloo (torch.multiprocessing) train the tiny model a few clipped AdamW steps
with loss-free bias updates on a fixed global batch split across ranks; the reference is one plain
process (torch's own clipping) on the whole batch. Compared: losses, step-0 gradients of every
parameter, gradient norms, router biases and updated weights. A DCP checkpoint written mid-run resumes
in a fresh sharded model (built on the meta device, with activation checkpointing) and in one plain
process, and converts to the release layout. The expert-parallel MoE is also checked directly
against the single-device MoE on the same tokens.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from stepflash.checkpoint import load_model, save_model
from stepflash.config import tiny
from stepflash.distributed import (ExpertParallelMoE, build_mesh, clip_grad_norm_, data_shard, expert_groups,
                                   full_state_dict, gather_model, global_expert_counts, init_distributed,
                                   parallelize)
from stepflash.checkpoint.dcp import load_checkpoint, save_checkpoint
from stepflash.checkpoint.convert import ConvertArgs
from stepflash.checkpoint.convert import run as convert
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM

STEPS, SAVE_AT, BATCH, SEQ = 4, 2, 4, 12
BIAS_RATE, LR = 1e-2, 3e-3


# ---- the training step every run shares ---------------------------------------------------------

def _model() -> Step35ForCausalLM:
    torch.manual_seed(0)
    return Step35ForCausalLM(tiny())


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, tiny().vocab_size, (BATCH, SEQ), generator=g)  # [B, T] global batch


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token CE plus 0.3 x the mean CE of the three chained MTP modules."""
    h = model.trunk(ids)
    logits = model.head(h)
    v = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    mtp = model.mtp_logits(ids, h)
    mtp_loss = sum(F.cross_entropy(lg[:, :-1].reshape(-1, v), ids[:, 2 + j:].reshape(-1)) for j, lg in enumerate(mtp))
    return loss + 0.3 * mtp_loss / len(mtp)


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (gathered from its shards: collective)."""
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def _train(model, opt, steps: range, rank: int = 0, world: int = 1, log: dict | None = None) -> list[float]:
    """Loss-free bias update from global counts, clipped AdamW step; returns the global mean losses.
    `log` collects the pre-clip gradient norm of every step and the full gradients of step 0."""
    for moe in model.moe_modules:
        moe.record_routing = True
    losses = []
    for step in steps:
        per = BATCH // world
        ids = _batch(step)[rank * per:(rank + 1) * per]
        loss = _loss(model, ids)
        loss.backward()
        if log is not None and step == 0:
            log["grads"] = _full_grads(model)
        # Sharded runs use ours (torch's cannot mix the dense and expert meshes); the reference torch's.
        norm = clip_grad_norm_(model, 0.5) if dist.is_initialized() else \
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if log is not None:
            log.setdefault("norms", []).append(norm.item())
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for moe, load in zip(model.moe_modules, global_expert_counts(model)):
                moe.router_bias += BIAS_RATE * torch.sign(load.mean() - load)
                moe.router_bias -= moe.router_bias.mean()
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses


def _reference() -> dict:
    """One process, whole batch: losses and grad norms of every step, first-step gradients, state after
    SAVE_AT steps and after STEPS."""
    model = _model()
    opt = _optimizer(model)
    log = {}
    losses = _train(model, opt, range(SAVE_AT), log=log)
    mid = {k: v.clone() for k, v in model.state_dict().items()}
    losses += _train(model, opt, range(SAVE_AT, STEPS), log=log)
    return dict(log, losses=losses, mid=mid, final=model.state_dict())


@pytest.fixture(scope="module")
def reference():
    return _reference()


# ---- process launching --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, layouts: list[tuple[int, int]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed()
    try:
        for dp, ep in layouts:  # several meshes in one launch: process start-up is the slow part
            _run_layout(rank, world, os.path.join(out_dir, f"dp{dp}_ep{ep}"), dp, ep)
    finally:
        dist.destroy_process_group()


def _spawn(out_dir, layouts: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
    world = layouts[0][0] * layouts[0][1]
    mp.spawn(_entry, args=(world, _free_port(), str(out_dir), layouts), nprocs=world, join=True)
    return {(dp, ep): torch.load(os.path.join(out_dir, f"dp{dp}_ep{ep}", "result.pt")) for dp, ep in layouts}


# ---- scenarios (run in every spawned process) --------------------------------------------------

def _ep_moe_matches(rank: int, ep_mesh) -> float:
    """Max |EP MoE - single-device MoE| on this rank's own tokens (each rank routes different tokens):
    output, input gradient, and the recorded routing counts and per-expert monitor sums."""
    model = _model()
    moe = model.moe_modules[0]
    ep_moe = ExpertParallelMoE.from_moe(moe, ep_mesh)
    for m in (moe, ep_moe):
        m.record_routing = m.record_expert_stats = True
    x = torch.randn(2, 7 + rank, model.config.hidden_size, generator=torch.Generator().manual_seed(rank))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = moe(xa), ep_moe(xb)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    errs = [(want - got).abs().max(), (xa.grad - xb.grad).abs().max()]
    errs += [(moe.last_routing[k].float() - ep_moe.last_routing[k].float()).abs().max()
             for k in ("counts", "out_norm_sum", "act_sq_sum")]
    return max(e.item() for e in errs)


def _run_layout(rank: int, world: int, out_dir: str, dp: int, ep: int) -> None:
    """Train, checkpoint mid-way, finish, then resume the checkpoint in a fresh sharded model."""
    mesh = build_mesh(dp, ep)
    result = {"data_shard": data_shard(mesh)}
    try:
        build_mesh(world + 1, 1)
    except UserError as e:
        result["mesh_error"] = str(e)
    if ep > 1:
        result["ep_moe_err"] = _ep_moe_matches(rank, mesh["ep"])
        # bf16 compute on gathered parameters (FSDP mixed precision), fp32 reduction: first loss only.
        bf16 = parallelize(_model(), mesh, ep=ep, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        result["bf16_loss"] = _train(bf16, _optimizer(bf16), range(1), rank, world)[0]
    model = parallelize(_model(), mesh, ep=ep)
    opt = _optimizer(model)
    log = {}
    losses = _train(model, opt, range(SAVE_AT), rank, world, log)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "ckpt")
    save_checkpoint(ckpt, model, opt, train_state={"step": SAVE_AT})
    mid = full_state_dict(model)
    losses += _train(model, opt, range(SAVE_AT, STEPS), rank, world, log)
    plain = gather_model(model)  # a plain model on rank 0, None elsewhere
    final = plain.state_dict() if rank == 0 else None
    # Resume the checkpoint the way a model too big for one device starts: built on the meta device,
    # parallelized, materialised shard by shard, then loaded; this time with activation checkpointing
    # (recomputation re-runs the all-to-alls in backward). Same continuation.
    with torch.device("meta"):
        model2 = Step35ForCausalLM(tiny())
    parallelize(model2, mesh, ep=ep, activation_checkpointing=True)
    model2.to_empty(device="cpu")
    opt2 = _optimizer(model2)
    step = load_checkpoint(ckpt, model2, opt2)["step"]
    resumed = _train(model2, opt2, range(step, STEPS), rank, world)
    if rank == 0:
        result.update(log, losses=losses, resumed=resumed, mid=mid, final=final)
        torch.save(result, os.path.join(out_dir, "result.pt"))


# ---- tests --------------------------------------------------------------------------------------

def _assert_states_close(got: dict, want: dict, exact: bool = False) -> None:
    """AdamW turns last-bit noise on near-zero gradients into steps of up to ~LR on a few isolated
    elements, so each element may differ by LR/10 but the mean difference must stay at float noise (a
    real bug moves many elements by ~LR). Gradient scale errors, which Adam hides, are caught by the
    gradient comparison."""
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if exact:
            assert torch.equal(g, w), name
            continue
        diff = (g.float() - w.float()).abs()
        assert diff.max() <= LR / 10 and diff.mean() <= LR * 1e-3, f"{name}: max {diff.max():.2e} mean {diff.mean():.2e}"


def _check_run(result, reference, tmp_path):
    ref_losses, ref_mid, ref_final = reference["losses"], reference["mid"], reference["final"]
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert result["norms"] == pytest.approx(reference["norms"], rel=1e-4)
    assert reference["norms"][0] > 0.5  # clipping is active, so the clip path is compared too
    for name, g in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)
    assert result["resumed"] == pytest.approx(ref_losses[SAVE_AT:], rel=1e-5, abs=1e-6)
    _assert_states_close(result["mid"], ref_mid)
    _assert_states_close(result["final"], ref_final)
    # The weights moved (a test that compares two untouched models could not fail).
    assert (ref_final["model.layers.1.moe.gate_proj.weight"] - _model().state_dict()[
        "model.layers.1.moe.gate_proj.weight"]).abs().max() > 1e-4
    assert ref_final["model.layers.1.moe.router_bias"].abs().max() > 0
    # The 2-process checkpoint resumes in one plain process and continues the same loss curve.
    model = _model()
    opt = _optimizer(model)
    step = load_checkpoint(str(tmp_path / "ckpt"), model, opt)["step"]
    assert step == SAVE_AT
    _assert_states_close(model.state_dict(), ref_mid)
    assert _train(model, opt, range(step, STEPS)) == pytest.approx(ref_losses[SAVE_AT:], rel=1e-5, abs=1e-6)
    _assert_states_close(model.state_dict(), ref_final)
    # The sharded training checkpoint (with optimizer state) converts to the release layout.
    convert(ConvertArgs(src=str(tmp_path / "ckpt"), dst=str(tmp_path / "release")))
    _assert_states_close(load_model(str(tmp_path / "release")).state_dict(), ref_mid)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Both 2-process layouts, dp=2 (pure FSDP) and ep=2 (experts split, dp=1), in one launch."""
    out = tmp_path_factory.mktemp("dist")
    return out, _spawn(out, [(2, 1), (1, 2)])


def test_data_parallel_matches_single_process(reference, two_process_runs):
    out, results = two_process_runs
    result = results[(2, 1)]
    assert result["data_shard"] == (0, 2)
    assert "dp * ep = 3 * 1 = 3" in result["mesh_error"]
    _check_run(result, reference, out / "dp2_ep1")


def test_expert_parallel_matches_single_process(reference, two_process_runs):
    out, results = two_process_runs
    result = results[(1, 2)]
    assert result["ep_moe_err"] < 1e-5  # the EP MoE alone, forward and input gradient, vs the plain MoE
    assert result["bf16_loss"] == pytest.approx(reference["losses"][0], rel=1e-2)
    _check_run(result, reference, out / "dp1_ep2")


@pytest.mark.slow
def test_data_and_expert_parallel_4_ranks(reference, tmp_path):
    result = _spawn(tmp_path, [(2, 2)])[(2, 2)]
    assert result["ep_moe_err"] < 1e-5
    _check_run(result, reference, tmp_path / "dp2_ep2")


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert not dist.is_initialized()
    with pytest.raises(UserError, match="torchrun"):
        build_mesh(1, 1)


def test_expert_groups_layout():
    assert expert_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_groups(288, 8)[7] == list(range(252, 288))


def test_convert_round_trip(tmp_path):
    model = _model()
    with torch.no_grad():  # a non-zero bias, so that the fp32 buffer is really carried
        model.moe_modules[0].router_bias.copy_(torch.linspace(-1, 1, model.config.moe_num_experts))
    save_model(model, str(tmp_path / "st"))
    convert(ConvertArgs(src=str(tmp_path / "st"), dst=str(tmp_path / "dcp")))
    convert(ConvertArgs(src=str(tmp_path / "dcp"), dst=str(tmp_path / "st2")))
    back = load_model(str(tmp_path / "st2"))
    _assert_states_close(back.state_dict(), model.state_dict(), exact=True)
    assert (tmp_path / "dcp" / "config.json").is_file()
