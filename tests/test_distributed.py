"""Sharded runs equal single-process runs: FSDP2 data parallel, expert parallel all-to-all, Muon on shards,
DCP resume.

Real processes on CPU with gloo (torch.multiprocessing) train the tiny model a few clipped steps with
loss-free bias updates on a fixed global batch split across ranks; the reference is one plain process
(torch's own clipping) on the whole batch. Two optimizers, both deterministic functions of the gradient,
so the comparisons can be tight (AdamW would turn last-bit reduction noise on near-zero gradients into
steps of ~lr, which no tolerance separates from a bug):
- SGD with momentum and weight decay on every parameter: weights differ from the reference only by the
  gradients' float noise times the learning rate;
- Muon on the hidden matrices (orthogonalised on owner ranks / per expert shard) + the same SGD on the rest.
Compared: losses, the gradients of every parameter at every step, gradient norms, router biases and the
updated weights (tight tolerances), before and after a DCP checkpoint written mid-run that resumes in a
fresh sharded model (built on the meta device, with activation checkpointing) and in one plain process,
and converts to the release layout. Also: the expert-parallel MoE against the single-device MoE on the same
tokens, Muon on uneven row shards (with a negative control: orthogonalising each shard alone is caught),
and bf16 mixed precision (fp32 norms and router, bf16 projections; the loss curve within bf16's tolerance,
less peak memory).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from stepflash.checkpoint import load_model, save_model
from stepflash.checkpoint.convert import ConvertArgs
from stepflash.checkpoint.convert import run as convert
from stepflash.checkpoint.dcp import load_checkpoint, save_checkpoint
from stepflash.config import tiny
from stepflash.distributed import (ExpertParallelMoE, build_mesh, clip_grad_norm_, data_shard, expert_groups,
                                   flat_mesh, full_state_dict, gather_model, global_expert_counts, init_distributed,
                                   parallelize)
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM
from stepflash.model.fused import fused_row_splits
from stepflash.training.muon import Muon, orthogonalize
from stepflash.training.optimizer import CombinedOptimizer, split_parameters

STEPS, SAVE_AT, BATCH, SEQ = 4, 2, 4, 12
BIAS_RATE, LR = 1e-2, 3e-2
OPTIMIZERS = ("sgd", "muon")


# ---- the training step every run shares ---------------------------------------------------------

def _model() -> Step35ForCausalLM:
    torch.manual_seed(0)
    return Step35ForCausalLM(tiny())


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, tiny().vocab_size, (BATCH, SEQ), generator=g)  # [B, T] global batch


def _optimizer(model, kind: str) -> CombinedOptimizer:
    """SGD (momentum, weight decay) on everything, or on all but the hidden matrices, which Muon takes."""
    groups = split_parameters(model)
    rest = groups["adamw_decay"] + groups["adamw_no_decay"]
    sgd = lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=0.1)  # noqa: E731
    if kind == "sgd":
        return CombinedOptimizer([sgd(rest + groups["muon"])])
    muon = Muon(groups["muon"], lr=LR / 10, weight_decay=0.1, row_splits=fused_row_splits(model))
    return CombinedOptimizer([sgd(rest), muon])


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
    """Loss-free bias update from global counts, clipped optimizer step; returns the global mean losses.
    `log` collects the pre-clip gradient norm and the full gradients of every step."""
    for moe in model.moe_modules:
        moe.record_routing = True
    losses = []
    for step in steps:
        per = BATCH // world
        ids = _batch(step)[rank * per:(rank + 1) * per]
        loss = _loss(model, ids)
        loss.backward()
        if log is not None:
            log.setdefault("grads", {})[step] = _full_grads(model)
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


def _reference(kind: str) -> dict:
    """One process, whole batch: losses, grad norms and gradients of every step, state after SAVE_AT steps
    and after STEPS."""
    model = _model()
    opt = _optimizer(model, kind)
    log = {}
    losses = _train(model, opt, range(SAVE_AT), log=log)
    mid = {k: v.clone() for k, v in model.state_dict().items()}
    losses += _train(model, opt, range(SAVE_AT, STEPS), log=log)
    return dict(log, losses=losses, mid=mid, final=model.state_dict())


@pytest.fixture(scope="module")
def reference():
    return {kind: _reference(kind) for kind in OPTIMIZERS}


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


def _muon_on_uneven_shards(mesh) -> tuple[float, float]:
    """Two Muon steps on matrices whose rows do not split evenly (5 rows: one rank short; 1 row: one rank
    empty; a fused 3 + 4 row weight whose parts straddle the ranks' blocks), sharded by rows over the
    world, against the same steps on plain tensors. Returns (max error,
    max error of orthogonalising each rank's rows alone: the bug the owner-rank exchange avoids)."""
    world = flat_mesh(mesh)
    shapes, g = [(5, 12), (1, 12), (16, 6), (2, 4, 6), (7, 12)], torch.Generator().manual_seed(7)
    full = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(2)]
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), world, [Shard(0)])) for t in full]
    opts = [Muon(params, lr=0.1, weight_decay=0.1, row_splits={id(params[-1]): [3, 4]}) for params in (plain, sharded)]
    for step in range(2):
        for params, opt in zip((plain, sharded), opts):
            for p, gr in zip(params, grads[step]):
                p.grad = distribute_tensor(gr, world, [Shard(0)]) if isinstance(p, DTensor) else gr.clone()
            opt.step()
    err = max((s.full_tensor() - p).abs().max().item() for s, p in zip(sharded, plain))
    local = distribute_tensor(grads[0][2], world, [Shard(0)]).to_local()  # a 16 x 6 matrix's rows on this rank
    lo = world.get_local_rank() * local.shape[0]
    naive = (orthogonalize(local) - orthogonalize(grads[0][2])[lo:lo + local.shape[0]]).abs().max().item()
    return err, naive


def _peak_memory_of_a_step(model, rank: int, world: int) -> int:
    """Peak tensor memory (bytes, this rank) of one forward + backward on this rank's share of a batch."""
    from stepflash.training.monitors import PeakMemory

    per = BATCH // world
    with PeakMemory() as pm:
        _loss(model, _batch(0)[rank * per:(rank + 1) * per].repeat(4, 4)).backward()
    model.zero_grad()
    return pm.peak


def _bf16_run(mesh, ep: int, rank: int, world: int) -> dict:
    """bf16 mixed precision: the dtype each kind of weight is gathered in, the SGD loss curve, and the peak
    memory of a step against the same model in fp32."""
    model = parallelize(_model(), mesh, ep=ep, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    seen = {}
    layer = model.model.layers[1]
    layer.moe.register_forward_pre_hook(lambda m, a: seen.update(router=m.gate.weight.dtype))
    layer.input_layernorm.register_forward_pre_hook(lambda m, a: seen.update(norm=m.weight.dtype))
    layer.self_attn.qkvg_proj.register_forward_pre_hook(lambda m, a: seen.update(q_proj=m.weight.dtype))
    peaks = [_peak_memory_of_a_step(parallelize(_model(), mesh, ep=ep), rank, world),
             _peak_memory_of_a_step(model, rank, world)]
    losses = _train(model, _optimizer(model, "sgd"), range(STEPS), rank, world)
    master = {p.dtype for p in model.parameters()}
    return {"dtypes": seen, "losses": losses, "master_dtypes": master, "peak_fp32_bf16": peaks}


def _run_layout(rank: int, world: int, out_dir: str, dp: int, ep: int) -> None:
    """For each optimizer: train, checkpoint mid-way, finish, then resume the checkpoint in a fresh sharded model."""
    mesh = build_mesh(dp, ep)
    result = {"data_shard": data_shard(mesh), "runs": {}}
    try:
        build_mesh(world + 1, 1)
    except UserError as e:
        result["mesh_error"] = str(e)
    if ep > 1:
        result["ep_moe_err"] = _ep_moe_matches(rank, mesh["ep"])
    result["muon_uneven"] = _muon_on_uneven_shards(mesh)
    result["bf16"] = _bf16_run(mesh, ep, rank, world)
    os.makedirs(out_dir, exist_ok=True)
    for kind, checkpointing in zip(OPTIMIZERS, ("full", "selective")):
        model = parallelize(_model(), mesh, ep=ep)
        opt = _optimizer(model, kind)
        log = {}
        losses = _train(model, opt, range(SAVE_AT), rank, world, log)
        ckpt = os.path.join(out_dir, f"ckpt_{kind}")
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
        parallelize(model2, mesh, ep=ep, activation_checkpointing=checkpointing)
        model2.to_empty(device="cpu")
        opt2 = _optimizer(model2, kind)
        step = load_checkpoint(ckpt, model2, opt2)["step"]
        resumed = _train(model2, opt2, range(step, STEPS), rank, world)
        result["runs"][kind] = dict(log, losses=losses, resumed=resumed, mid=mid, final=final)
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))


# ---- tests --------------------------------------------------------------------------------------

def _assert_states_close(got: dict, want: dict, exact: bool = False) -> None:
    """Same tensors to float noise: the optimizers are linear (SGD) or smooth (Muon) in the gradient, whose
    sharded reduction differs from one process's only in the last bits."""
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if exact:
            assert torch.equal(g, w), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6, msg=name)


def _check_run(result: dict, reference: dict, ckpt_dir, kind: str):
    run, ref = result["runs"][kind], reference[kind]
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert run["norms"] == pytest.approx(ref["norms"], rel=1e-4)
    assert ref["norms"][0] > 0.5  # clipping is active, so the clip path is compared too
    for step, grads in ref["grads"].items():
        for name, g in grads.items():
            torch.testing.assert_close(run["grads"][step][name], g, atol=1e-6, rtol=1e-4, msg=f"step {step} {name}")
    assert run["resumed"] == pytest.approx(ref["losses"][SAVE_AT:], rel=1e-5, abs=1e-6)
    _assert_states_close(run["mid"], ref["mid"])
    _assert_states_close(run["final"], ref["final"])
    # The weights moved (a test that compares two untouched models could not fail).
    for name in ("model.layers.1.moe.gate_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.embed_tokens.weight"):
        assert (ref["final"][name] - _model().state_dict()[name]).abs().max() > 1e-4, name
    assert ref["final"]["model.layers.1.moe.router_bias"].abs().max() > 0
    # The sharded checkpoint resumes in one plain process and continues the same loss curve.
    model = _model()
    opt = _optimizer(model, kind)
    step = load_checkpoint(str(ckpt_dir / f"ckpt_{kind}"), model, opt)["step"]
    assert step == SAVE_AT
    _assert_states_close(model.state_dict(), ref["mid"])
    assert _train(model, opt, range(step, STEPS)) == pytest.approx(ref["losses"][SAVE_AT:], rel=1e-5, abs=1e-6)
    _assert_states_close(model.state_dict(), ref["final"])
    # The sharded training checkpoint (with optimizer state) converts to the release layout.
    convert(ConvertArgs(src=str(ckpt_dir / f"ckpt_{kind}"), dst=str(ckpt_dir / f"release_{kind}")))
    _assert_states_close(load_model(str(ckpt_dir / f"release_{kind}")).state_dict(), ref["mid"])


def _check_layout(result: dict, reference: dict) -> None:
    err, naive = result["muon_uneven"]
    assert err < 1e-6 and naive > 1e-2, (err, naive)
    bf16 = result["bf16"]
    assert bf16["dtypes"] == {"router": torch.float32, "norm": torch.float32, "q_proj": torch.bfloat16}
    assert bf16["master_dtypes"] == {torch.float32}
    fp32_peak, bf16_peak = bf16["peak_fp32_bf16"]
    assert bf16_peak < 0.8 * fp32_peak, (bf16_peak, fp32_peak)
    assert bf16["losses"] == pytest.approx(reference["sgd"]["losses"], rel=2e-2)
    assert bf16["losses"] != pytest.approx(reference["sgd"]["losses"], rel=1e-5)  # bf16 really was in effect


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Both 2-process layouts, dp=2 (pure FSDP) and ep=2 (experts split, dp=1), in one launch."""
    out = tmp_path_factory.mktemp("dist")
    return out, _spawn(out, [(2, 1), (1, 2)])


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_data_parallel_matches_single_process(reference, two_process_runs, kind):
    out, results = two_process_runs
    result = results[(2, 1)]
    assert result["data_shard"] == (0, 2)
    assert "dp * ep = 3 * 1 = 3" in result["mesh_error"]
    _check_layout(result, reference)
    _check_run(result, reference, out / "dp2_ep1", kind)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_expert_parallel_matches_single_process(reference, two_process_runs, kind):
    out, results = two_process_runs
    result = results[(1, 2)]
    assert result["ep_moe_err"] < 1e-5  # the EP MoE alone, forward and input gradient, vs the plain MoE
    _check_layout(result, reference)
    _check_run(result, reference, out / "dp1_ep2", kind)


@pytest.mark.slow
def test_data_and_expert_parallel_4_ranks(reference, tmp_path):
    result = _spawn(tmp_path, [(2, 2)])[(2, 2)]
    assert result["ep_moe_err"] < 1e-5
    _check_layout(result, reference)
    for kind in OPTIMIZERS:
        _check_run(result, reference, tmp_path / "dp2_ep2", kind)


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    rt = init_distributed()
    assert (rt.rank, rt.world_size, rt.is_main, rt.distributed) == (0, 1, True, False)
    assert not dist.is_initialized()
    assert rt.sum([2.0, 3.0]) == [2.0, 3.0] and rt.span(5) == (0, 5) and rt.token_weight(7) == 1.0
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
