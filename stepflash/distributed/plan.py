"""`stepflash plan PRESET --gpus N --gpu-mem GB`: memory per GPU for training and serving a config.

Parameters are counted from the model itself, built on the meta device (no memory), and split into
routed-expert parameters (the stacked `moe.{gate,up,down}_proj` weights) and dense ones (everything
else: attention, norms, router, shared experts, dense MLPs, embeddings, heads, MTP modules).

Training layout, as `parallelize` builds it, on N GPUs with pp pipeline stages (D = N / pp ranks per
stage, D = dp * ep): dense parameters are FSDP-sharded over the D ranks; experts are split over ep and
each slice FSDP-sharded over dp, so every rank holds 1/N of all parameter state either way. What ep
changes is the transient memory: a gathered MoE layer holds E/ep experts, not E. (`parallelize` does
not implement pipeline stages yet; pp is a planning figure: layers split evenly, and with a 1F1B
schedule the first stage holds pp micro-batches in flight, so activation memory does not shrink.)

Per parameter, `--master fp32` (default): fp32 sharded parameters (the master copy; compute runs on
bf16 gathers), fp32 gradients and AdamW's two fp32 moments = 16 bytes. `--master bf16`: bf16
parameters and gradients with fp32 moments = 12 bytes (needs an optimizer keeping fp32 state).

Activations per token are counted tensor by tensor from what autograd saves in this implementation
(bf16 compute, fp32 RMSNorm internals, efficient attention saving output and log-sum-exp);
tests/test_plan.py checks the formula against the tensors autograd really saves on a small config.
Activation checkpointing (one checkpoint per decoder layer) keeps only each layer's input plus one
layer's activations during recomputation. The loss head keeps fp32 log-probabilities over the vocab.

Serving: bf16 weights spread over all N GPUs (attention tensor-parallel, experts expert-parallel, as
vLLM / SGLang do with TP = N and expert parallelism on), KV cache in bf16 split over
min(N, KV heads) ranks; the S3F1 layout keeps every token on full layers and at most `sliding_window`
tokens on sliding layers (the 3 MTP layers are sliding and are counted: they serve speculation).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from stepflash.config import Step35Config, resolve_config
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM

GIB = 1024 ** 3
BF16 = 2
EXPERT_SUFFIXES = ("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight")


@dataclass
class PlanArgs:
    """Memory per GPU (parameters, gradients, optimizer state, activations, KV cache) and whether it fits."""

    preset: str = field(metadata={"positional": True, "help": "preset (flash, small, tiny) or config.json path"})
    gpus: int = field(default=8, metadata={"help": "number of GPUs"})
    gpu_mem: float = field(default=80.0, metadata={"help": "memory per GPU in GiB"})
    seq: int = field(default=4096, metadata={"help": "training sequence length and serving context length"})
    ep: int = field(default=8, metadata={"help": "expert parallel size (divides the experts and gpus / pp)"})
    pp: int = field(default=1, metadata={"help": "pipeline stages (planning only; not implemented in parallelize)"})
    micro_batch: int = field(default=1, metadata={"help": "sequences per GPU per micro-batch (training)"})
    batch: int = field(default=1, metadata={"help": "concurrent sequences at full context (serving)"})
    master: str = field(default="fp32", metadata={"help": "fp32 (fp32 master params+grads, 16 B/param) or bf16 (12 B)"})
    mtp_train: int = field(default=1, metadata={"help": "MTP modules trained (their activations count)"})
    reserve: float = field(default=4.0, metadata={"help": "GiB kept free per GPU (CUDA context, NCCL, fragmentation)"})
    json: bool = field(default=False, metadata={"help": "print the plan as JSON"})


@dataclass
class ParamCounts:
    total: int
    trunk: int  # embedding + decoder layers + final norm + lm_head
    mtp: int
    expert: int
    dense: int
    embed_and_head: int
    layers: list[tuple[int, int]]  # per decoder layer (trunk then MTP): (dense, routed-expert) parameters

    def largest_unit(self, ep: int) -> float:
        """Parameters one rank gathers for its largest FSDP unit (a layer; E/ep experts of a MoE layer)."""
        return max(dense + expert / ep for dense, expert in self.layers)


def count_parameters(cfg: Step35Config) -> ParamCounts:
    with torch.device("meta"):
        model = Step35ForCausalLM(cfg)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(sizes.values())
    expert = sum(n for name, n in sizes.items() if name.endswith(EXPERT_SUFFIXES))
    mtp = sum(p.numel() for layer in model.mtp_layers for p in layer.parameters())
    layers = []
    for layer in model.model.layers:
        named = dict(layer.named_parameters())
        ex = sum(p.numel() for n, p in named.items() if n.endswith(EXPERT_SUFFIXES))
        layers.append((sum(p.numel() for p in named.values()) - ex, ex))
    embed_head = sizes["model.embed_tokens.weight"] + sizes["lm_head.weight"]
    return ParamCounts(total=total, trunk=total - mtp, mtp=mtp, expert=expert, dense=total - expert,
                       embed_and_head=embed_head, layers=layers)


# ---- activations ----------------------------------------------------------------------------------

def layer_activation_bytes_per_token(cfg: Step35Config, i: int, seq: int) -> int:
    """Bytes autograd keeps per token for decoder layer i (bf16 compute) at sequence length seq.

    Term by term: each RMSNorm keeps its fp32 input and normalised output (8 B/element); projections
    keep their bf16 input; q/k per-head norms as RMSNorm; attention keeps q, k, v, its output and an
    fp32 log-sum-exp per head; the head gate keeps its sigmoid; o_proj its input. A sliding layer past
    the window also keeps the boolean [T, S] mask (S bytes per token). The router keeps the fp32 input
    and probabilities; each of the k routed rows keeps its gathered input, gate / activation / up /
    product (4 x inter) and its output before and after weighting; the shared expert and dense MLP
    keep input, gate, activation, up and product."""
    h, hq, hkv, d = cfg.hidden_size, cfg.num_heads(i), cfg.num_kv_heads(i), cfg.head_dim_of(i)
    norms = 2 * 8 * h  # input_layernorm, post_attention_layernorm
    attn = (BF16 * h  # q/k/v/g projections' input
            + 8 * (hq + hkv) * d  # q_norm, k_norm (fp32 input and output)
            + BF16 * (hq + 2 * hkv) * d  # q, k (after RoPE), v into attention
            + BF16 * hq * d + 4 * hq  # attention output, log-sum-exp
            + BF16 * hq  # sigmoid gate
            + BF16 * hq * d)  # o_proj input
    if cfg.is_sliding(i) and seq > cfg.sliding_window:
        attn += seq  # bool mask row
    if cfg.is_moe(i):
        k, inter, e = cfg.moe_top_k, cfg.moe_intermediate_size, cfg.moe_num_experts
        router = 4 * h + 4 * e + 40 * k  # fp32 input, probabilities; top-k ids / weights
        routed = k * (3 * BF16 * h + 4 * BF16 * inter)  # per row: input, 4 x inter, output, weighted output
        shared = BF16 * h + 4 * BF16 * cfg.share_expert_dim
        ffn = router + routed + shared
    else:
        ffn = BF16 * h + 4 * BF16 * cfg.intermediate_size
    if i >= cfg.num_hidden_layers:  # MTP: enorm, hnorm, eh_proj input
        ffn += 2 * 8 * h + BF16 * 2 * h
    return norms + attn + ffn


def head_activation_bytes_per_token(cfg: Step35Config) -> int:
    """Final norm, lm_head input and the fp32 log-probabilities over the vocabulary (plus its bf16 logits)."""
    return 8 * cfg.hidden_size + BF16 * cfg.hidden_size + (4 + BF16) * cfg.vocab_size


def activation_bytes(cfg: Step35Config, seq: int, micro_batch: int, mtp_train: int, checkpointing: bool) -> int:
    trunk = list(range(cfg.num_hidden_layers))
    mtp = list(range(cfg.num_hidden_layers, cfg.num_hidden_layers + min(mtp_train, cfg.num_nextn_predict_layers)))
    per_layer = [layer_activation_bytes_per_token(cfg, i, seq) for i in trunk + mtp]
    heads = (1 + len(mtp)) * head_activation_bytes_per_token(cfg)
    if checkpointing:
        per_token = len(per_layer) * BF16 * cfg.hidden_size + max(per_layer) + heads
    else:
        per_token = sum(per_layer) + heads
    return per_token * seq * micro_batch


# ---- KV cache -------------------------------------------------------------------------------------

def kv_cache_bytes(cfg: Step35Config, context: int, include_mtp: bool = True) -> int:
    """bf16 K and V for one sequence at `context` tokens: sliding layers keep at most the window."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    total = 0
    for i in range(layers):
        tokens = min(context, cfg.sliding_window) if cfg.is_sliding(i) else context
        total += tokens * 2 * cfg.num_kv_heads(i) * cfg.head_dim_of(i) * BF16
    return total


# ---- the plan -------------------------------------------------------------------------------------

def _check(cfg: Step35Config, args: PlanArgs) -> None:
    if args.gpus < 1 or args.pp < 1 or args.ep < 1 or args.micro_batch < 1 or args.batch < 1:
        raise UserError("--gpus, --pp, --ep, --micro-batch and --batch must be >= 1")
    if args.gpus % args.pp:
        raise UserError(f"--pp {args.pp} must divide --gpus {args.gpus}")
    ranks = args.gpus // args.pp
    if ranks % args.ep:
        raise UserError(f"--ep {args.ep} must divide the {ranks} GPUs of a pipeline stage")
    if cfg.moe_num_experts % args.ep:
        raise UserError(f"--ep {args.ep} must divide the number of experts {cfg.moe_num_experts}")
    if args.pp > cfg.num_hidden_layers:
        raise UserError(f"--pp {args.pp} exceeds the {cfg.num_hidden_layers} layers")
    if args.master not in ("fp32", "bf16"):
        raise UserError(f"--master must be fp32 or bf16, got {args.master!r}")
    if args.seq < 1 or args.gpu_mem <= 0:
        raise UserError("--seq and --gpu-mem must be positive")


def make_plan(cfg: Step35Config, args: PlanArgs) -> dict:
    _check(cfg, args)
    p = count_parameters(cfg)
    n, ep = args.gpus, args.ep
    dp = n // args.pp // ep
    param_b, grad_b, optim_b = (4, 4, 8) if args.master == "fp32" else (2, 2, 8)
    per_gpu_params = p.total / n  # dense / (dp*ep) and experts / ep / dp, per stage of 1/pp
    unit = p.largest_unit(ep)
    transient = (2 * unit * BF16  # the layer computing and the next one prefetched
                 + unit * 4  # its unsharded fp32 gradients before the reduce-scatter
                 + p.embed_and_head * BF16)  # the root unit stays gathered through the step
    training = {
        "parameters": per_gpu_params * param_b,
        "gradients": per_gpu_params * grad_b,
        "optimizer": per_gpu_params * optim_b,
        "gathered_params_and_grads": transient,
        "activations": activation_bytes(cfg, args.seq, args.micro_batch, args.mtp_train, False),
        "activations_checkpointed": activation_bytes(cfg, args.seq, args.micro_batch, args.mtp_train, True),
    }
    fixed = sum(training[k] for k in ("parameters", "gradients", "optimizer", "gathered_params_and_grads"))
    budget = (args.gpu_mem - args.reserve) * GIB
    training["total"] = fixed + training["activations"]
    training["total_checkpointed"] = fixed + training["activations_checkpointed"]
    kv_seq = kv_cache_bytes(cfg, args.seq)
    kv_split = min(n, min(cfg.num_kv_heads(i) for i in range(cfg.num_hidden_layers)))
    weights = p.total * BF16 / n
    free = budget - weights
    inference = {
        "weights": weights,
        "kv_cache_per_sequence": kv_seq,
        "kv_cache_per_sequence_per_gpu": kv_seq / kv_split,
        "kv_cache": args.batch * kv_seq / kv_split,
        "total": weights + args.batch * kv_seq / kv_split,
        "max_sequences": max(0, math.floor(free / (kv_seq / kv_split))),
    }
    return {
        "config": args.preset, "gpus": n, "gpu_mem_gib": args.gpu_mem, "reserve_gib": args.reserve,
        "seq": args.seq, "pp": args.pp, "ep": ep, "dp": dp, "micro_batch": args.micro_batch,
        "batch": args.batch, "master": args.master,
        "params": {k: v for k, v in asdict(p).items() if k != "layers"},
        "largest_unit_params": unit,
        "training_bytes": training,
        "training_fits": training["total"] <= budget,
        "training_fits_checkpointed": training["total_checkpointed"] <= budget,
        "inference_bytes": inference,
        "inference_fits": inference["total"] <= budget,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_plan(plan: dict) -> str:
    p, t, inf = plan["params"], plan["training_bytes"], plan["inference_bytes"]
    yes = {True: "fits", False: "does NOT fit"}
    bpp = "16 B/param: fp32 params + fp32 grads + AdamW fp32 m, v" if plan["master"] == "fp32" else \
        "12 B/param: bf16 params + bf16 grads + AdamW fp32 m, v"
    lines = [
        f"{plan['config']}: {p['total'] / 1e9:.2f}B parameters (trunk {p['trunk'] / 1e9:.2f}B + MTP {p['mtp'] / 1e9:.2f}B); "
        f"routed experts {p['expert'] / 1e9:.2f}B, dense {p['dense'] / 1e9:.2f}B",
        f"{plan['gpus']} GPUs x {plan['gpu_mem_gib']:g} GiB ({plan['reserve_gib']:g} GiB reserved each); "
        f"pp={plan['pp']} ep={plan['ep']} dp={plan['dp']}; seq {plan['seq']}",
        "",
        f"training per GPU (micro-batch {plan['micro_batch']}; {bpp}; dense sharded over dp*ep, experts over ep then dp):",
        f"  parameters              {_gib(t['parameters'])}",
        f"  gradients               {_gib(t['gradients'])}",
        f"  optimizer state         {_gib(t['optimizer'])}",
        f"  gathered layers + root  {_gib(t['gathered_params_and_grads'])}",
        f"  activations             {_gib(t['activations'])}   -> total {_gib(t['total'])}: {yes[plan['training_fits']]}",
        f"  activations (ckpt)      {_gib(t['activations_checkpointed'])}   -> total "
        f"{_gib(t['total_checkpointed'])}: {yes[plan['training_fits_checkpointed']]}",
        "",
        f"inference per GPU (bf16 weights over {plan['gpus']} GPUs, KV over min(GPUs, KV heads), {plan['batch']} sequence(s) "
        f"at {plan['seq']} tokens):",
        f"  weights                 {_gib(inf['weights'])}",
        f"  KV cache                {_gib(inf['kv_cache'])}   ({inf['kv_cache_per_sequence'] / 2**20:.1f} MiB per "
        f"sequence before splitting)",
        f"  total                   {_gib(inf['total'])}: {yes[plan['inference_fits']]}; room for "
        f"{inf['max_sequences']} sequences at this context",
    ]
    return "\n".join(lines)


def run(args: PlanArgs) -> int:
    cfg = resolve_config(args.preset)
    plan = make_plan(cfg, args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
