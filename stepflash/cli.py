"""`stepflash <verb>`: one entry point, one dataclass of arguments per verb.

Each verb lives in its own module, which defines a dataclass of arguments and a `run(args)` function.
The dataclass fields become the verb's flags (`max_new_tokens` -> `--max-new-tokens`); a field whose
metadata says `positional=True` becomes a positional argument. Modules are imported only when their
verb runs, so `stepflash info` does not pay for FastAPI or the trainer.

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
    "tokenizer train": ("stepflash.tokenizer", "TrainTokenizerArgs", "train a byte-level BPE with the chat special tokens"),
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
    "convert": ("stepflash.checkpoint.convert", "ConvertArgs", "convert between DCP and safetensors checkpoints"),
    "plan": ("stepflash.distributed.plan", "PlanArgs", "memory plan per GPU for training and inference"),
}


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
    return parser


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
    ns = build_parser(verb, args_cls).parse_args(rest)
    try:
        args = args_cls(**vars(ns))
        result = module.run(args)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"stepflash {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepflash {verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
