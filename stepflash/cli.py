"""`stepflash <verb>`: one entry point, one dataclass of arguments per verb.

Each verb lives in its own module, which defines a dataclass of arguments and a `run(args)` function.
The dataclass fields become the verb's flags (`max_new_tokens` -> `--max-new-tokens`); a field whose
metadata says `positional=True` becomes a positional argument. Modules are imported only when their
verb runs, so `stepflash info` does not pay for FastAPI or the trainer.

Every verb that computes (the THREADED table) also gets `--threads N`: the CLI applies the thread
policy of `stepflash/threads.py` before the verb runs (N, or by default the count measured fastest here
for that kind of work) and prints the choice once; a verb whose dataclass has a `threads` field of its
own receives the count chosen.

Errors a user can cause are raised as `stepflash.errors.UserError` (or `ConfigError`) anywhere below and printed here as
one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing

from stepflash.errors import ConfigError, UserError

# verb -> (module, dataclass name, one-line help). Two-word verbs ("data prepare") are matched first.
VERBS: dict[str, tuple[str, str, str]] = {
    "info": ("stepflash.accounting", "InfoArgs", "parameters, active parameters, KV bytes and FLOPs of a config"),
    "generate": ("stepflash.inference.cli", "GenerateArgs", "generate from a checkpoint (optionally with MTP speculation)"),
    "data prepare": ("stepflash.training.data", "PrepareArgs", "tokenize text into memory-mapped shards"),
    "tokenizer train": ("stepflash.training.tokenizer_train", "TrainTokenizerArgs", "train a byte-level BPE with the chat special tokens"),
    "train": ("stepflash.training.loop", "TrainArgs", "pre-train a model (MoE balancing, MTP loss, monitors)"),
    "plot": ("stepflash.plot", "PlotArgs", "draw a run's metrics.jsonl to PNG"),
    "serve": ("stepflash.server.app", "ServeArgs", "OpenAI-compatible HTTP server"),
    "sft": ("stepflash.posttrain.sft", "SFTArgs", "supervised fine-tuning on chat conversations"),
    "rm train": ("stepflash.posttrain.reward_model", "RMTrainArgs", "train a Bradley-Terry preference reward model"),
    "mtp": ("stepflash.posttrain.mtp_phase", "MTPPhaseArgs", "the MTP phase: clone MTP module 1 into the others, "
            "train them jointly (trunk frozen)"),
    "rl": ("stepflash.rl.trainer", "RLArgs", "RL post-training: MIS-PO, PPO or GRPO"),
    "eval": ("stepflash.evaluation.harness", "EvalArgs", "score a checkpoint or predictions on math/code/tool tasks"),
    "recipe": ("stepflash.posttrain.recipe", "RecipeArgs", "the report's specialise-then-consolidate post-training recipe"),
    "convert": ("stepflash.checkpoint.convert", "ConvertArgs", "convert between DCP and safetensors checkpoints, or to GGUF (llama.cpp)"),
    "plan": ("stepflash.distributed.plan", "PlanArgs", "memory plan per GPU for training and inference"),
}

# verb -> the kind of work its thread probe measures (stepflash.threads.PROBES).
THREADED: dict[str, str] = {
    "train": "train", "sft": "train", "rm train": "train", "rl": "train", "recipe": "train", "mtp": "train",
    "generate": "decode", "serve": "decode", "eval": "decode",
}
THREADS_HELP = ("torch CPU threads (0: time this verb's kind of work at 1 thread and at torch's default on this "
                "machine, as loaded now, and keep the faster; OMP_NUM_THREADS, when set, is used instead)")


def _flag_type(tp):
    """Map a dataclass field annotation to (argparse type, nargs, is_bool)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0])
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        return inner, "*", False
    if tp is bool:
        return None, None, True
    return tp, None, False


def build_parser(verb: str, args_cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"stepflash {verb}", description=(args_cls.__doc__ or "").strip())
    hints = typing.get_type_hints(args_cls)
    for f in dataclasses.fields(args_cls):
        if f.name == "threads" and verb in THREADED:
            continue  # the one --threads flag is added below
        tp, nargs, is_bool = _flag_type(hints[f.name])
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=tp, nargs="?" if has_default else None, default=default, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=tp, nargs=nargs, default=default, required=not has_default,
                                help=f"{help_text} (default: {default})" if has_default else help_text)
    if verb in THREADED:
        parser.add_argument("--threads", type=int, default=0, help=f"{THREADS_HELP} (default: 0)")
    return parser


def _apply_threads(verb: str, args, requested: int):
    """The thread policy, applied before the verb runs; a verb with a `threads` field gets the count. The
    choice is printed once the verb has run for a second, so bad input still gives only its one-line error."""
    from stepflash.threads import DeferredLine, apply_threads, is_main_rank

    choice = apply_threads(requested, THREADED[verb], getattr(args, "device", None), announce=False)
    if hasattr(args, "threads"):
        args.threads = choice.threads
    return DeferredLine(choice.describe()) if is_main_rank() else None


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: stepflash <verb> [flags]   (stepflash <verb> --help for its flags)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, _, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb = " ".join(argv[:2]) if " ".join(argv[:2]) in VERBS else argv[0]
    if verb not in VERBS:
        print(f"stepflash: unknown verb {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    rest = argv[len(verb.split()):]
    module_name, cls_name, _ = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("stepflash"):
            print(f"stepflash {verb}: not implemented yet ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    args_cls = getattr(module, cls_name)
    fields = vars(build_parser(verb, args_cls).parse_args(rest))
    threads = fields.pop("threads", 0) if verb in THREADED else None
    announcement = None
    try:
        has_threads = any(f.name == "threads" for f in dataclasses.fields(args_cls))
        args = args_cls(**fields, **({"threads": threads} if has_threads and threads is not None else {}))
        if threads is not None:
            announcement = _apply_threads(verb, args, threads)
        result = module.run(args)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"stepflash {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepflash {verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        if announcement is not None:
            announcement.cancel()  # a verb done within the second had no use for it
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
