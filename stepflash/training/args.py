"""The arguments of `stepflash train` and their checks (one dataclass: its fields are the CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepflash.errors import UserError
from stepflash.training.muon import ITERATIONS, PRECISIONS

PRECISION_CHOICES = ("auto", "fp32", "bf16")
CHECKPOINTING = ("none", "selective", "full")


@dataclass
class TrainArgs:
    """Pre-train a Step 3.5 Flash-style model (MoE balancing, MTP loss, stability monitors)."""

    preset: str = field(default="small", metadata={"help": "preset (tiny, small, flash) or config.json / checkpoint dir"})
    data: str | None = field(default=None, metadata={
        "help": "prepared data dir (stepflash data prepare); default: the Python stdlib, prepared once and cached"})
    out: str = field(default="runs/train", metadata={"help": "run directory (checkpoints, metrics.jsonl)"})
    steps: int = field(default=1000, metadata={
        "help": "optimizer steps in all: the schedule's length, also on --resume (continue to this step)"})
    resume: bool = field(default=False, metadata={"help": "continue from the run directory's latest checkpoint"})
    init_from: str | None = field(default=None, metadata={"help": "start from this checkpoint's weights"})
    batch_size: int = field(default=8, metadata={
        "help": "sequences per micro-batch over all processes (global); under torchrun each of N processes "
                "takes batch_size / N, so a step is batch_size * grad_accum sequences at any world size"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    optimizer: str = field(default="auto", metadata={
        "help": "muon (Muon for hidden matrices + AdamW for the rest), adamw, or auto: muon at every world size, "
                "the checkpoint's own when resuming"})
    muon_precision: str = field(default="auto", metadata={
        "help": "dtype of Muon's orthogonalisation: fp32, bf16, fp16 (the report's), or auto: fp32 on CPU, fp16 on GPU"})
    muon_iteration: str = field(default="newton-schulz", metadata={
        "help": "Muon's orthogonalisation: newton-schulz (Jordan's quintic) or polar-express (the report's)"})
    precision: str = field(default="auto", metadata={
        "help": "fp32, or bf16 mixed precision (fp32 master weights and optimizer; norms and router in fp32; "
                "FSDP2's policy under torchrun, autocast in one process); auto: bf16 on GPU, fp32 on CPU"})
    activation_checkpointing: str = field(default="none", metadata={
        "help": "recompute activations in backward: none, selective (every second layer) or full (every layer)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak (cosine)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    mtp_weight: float = field(default=0.3, metadata={"help": "weight of the MTP loss (0: do not train MTP)"})
    mtp_depth_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0],
                                           metadata={"help": "relative weight of each MTP module"})
    bias_update_rate: float = field(default=1e-3, metadata={"help": "loss-free router-bias step (0: off)"})
    ep_loss_coef: float = field(default=1e-3, metadata={"help": "EP-group balance loss coefficient (0: off)"})
    ep_groups: int = field(default=0, metadata={
        "help": "expert groups G of the EP-group balance loss (0: --expert-parallel when > 1, else 4)"})
    expert_parallel: int = field(default=1, metadata={
        "help": "under torchrun: split the routed experts over groups of this many processes (must divide the "
                "process count and the experts); the rest of the model is FSDP-sharded over all processes"})
    export: bool = field(default=True, metadata={
        "help": "under torchrun: also write the release safetensors into the final checkpoint (gathers the whole "
                "model on rank 0; --no-export for models that do not fit, then `stepflash convert`)"})
    eval_every: int = field(default=-1, metadata={
        "help": "validate every N steps (-1: ten times over the run, so the validation curve has points; "
                "0: only at the end)"})
    val_batches: int = field(default=8, metadata={"help": "validation batches per evaluation"})
    log_every: int = field(default=10, metadata={"help": "write metrics every N steps"})
    save_every: int = field(default=200, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (0: all)"})
    spike_z: float = field(default=6.0, metadata={"help": "loss spike threshold in running std (0: off)"})
    skip_spikes: bool = field(default=False, metadata={"help": "skip the optimizer step on a loss spike"})
    time_limit_s: float = field(default=0.0, metadata={"help": "stop (and save) after this many seconds (0: none)"})
    seed: int = field(default=0, metadata={"help": "initialisation and data-order seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:i]"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if self.ep_groups == 0:  # the balance loss's groups are the expert-parallel ranks (SPEC section 6)
            self.ep_groups = self.expert_parallel if self.expert_parallel > 1 else 4


def check_args(args: TrainArgs, world_size: int = 1) -> None:
    """One-line errors for flags that cannot work (world_size: the processes of the run)."""
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "ep_groups", "log_every", "save_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.optimizer not in ("auto", "muon", "adamw"):
        raise UserError(f"--optimizer must be auto, muon or adamw, got {args.optimizer!r}")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is the global micro-batch: it must be a multiple of the "
                        f"{world_size} processes")
    if args.expert_parallel > 1 and args.ep_groups != args.expert_parallel:
        raise UserError(f"--ep-groups {args.ep_groups} must equal --expert-parallel {args.expert_parallel} (the balance "
                        "loss groups are the expert-parallel ranks); leave it at 0")
    if args.lr <= 0 or args.mtp_weight < 0 or args.ep_loss_coef < 0 or args.bias_update_rate < 0:
        raise UserError("--lr must be positive and --mtp-weight, --ep-loss-coef, --bias-update-rate non-negative")
    if args.precision not in PRECISION_CHOICES:
        raise UserError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {args.precision!r}")
    if args.activation_checkpointing not in CHECKPOINTING:
        raise UserError(f"--activation-checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                        f"got {args.activation_checkpointing!r}")
    if args.muon_precision not in ("auto", *PRECISIONS):
        raise UserError(f"--muon-precision must be auto, {', '.join(PRECISIONS)}, got {args.muon_precision!r}")
    if args.muon_iteration not in ITERATIONS:
        raise UserError(f"--muon-iteration must be one of {', '.join(ITERATIONS)}, got {args.muon_iteration!r}")
