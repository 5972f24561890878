"""The recipe's results: OUT/results.json (every number) and OUT/results.md (the tables the docs quote).

Three tables: stage x domain greedy accuracy from the eval harness (plus extra columns such as the
first-turn tool-call accuracy, outside the mean); for each domain, the expert's gain over
the SFT start and how much of it the consolidated student and the final model keep (kept = student gain /
expert gain; "-" where the expert did not gain); and the MTP accepted draft length before the MTP phase,
after cloning module 1 and after the joint training.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from stepflash.posttrain.recipe_data import DOMAINS

SFT, STUDENT, FINAL = "0_sft", "2_consolidated", "3_final_mispo"


def gains(accuracy: dict) -> dict:
    """Per domain: sft, expert, student and final accuracy, and the fraction of the expert's gain kept."""
    out = {}
    for d in DOMAINS:
        sft, expert = accuracy[SFT][d], accuracy[f"1_expert_{d}"][d]
        row = {"sft": sft, "expert": expert, "expert_gain": expert - sft}
        for name, stage in (("student", STUDENT), ("final", FINAL)):
            row[name] = accuracy[stage][d]
            row[f"{name}_kept"] = (row[name] - sft) / (expert - sft) if expert > sft else None
        out[d] = row
    return out


def _stage_seconds(ctx, stages) -> dict:
    secs = {}
    for s in stages:
        path = ctx.path("work", f"{s}.seconds")
        if os.path.isfile(path):
            with open(path) as f:
                secs[s] = float(f.read())
    return secs


def markdown(accuracy: dict, items: dict, table: dict, mtp: dict | None) -> str:
    extra = [k for k in next(iter(accuracy.values())) if k not in DOMAINS]  # e.g. tool_call, after the mean
    lines = ["| stage | " + " | ".join([f"{d} ({items[d]})" for d in DOMAINS] + ["mean"] + extra) + " |",
             "|---|" + "---|" * (len(DOMAINS) + 1 + len(extra))]
    for stage, accs in accuracy.items():
        mean = sum(accs[d] for d in DOMAINS) / len(DOMAINS)
        cells = [accs[d] for d in DOMAINS] + [mean] + [accs.get(k, float("nan")) for k in extra]
        lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    kept = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    lines += ["", "| domain | SFT | expert (gain) | consolidated (kept) | final MIS-PO (kept) |", "|---|---|---|---|---|"]
    for d, r in table.items():
        lines.append(f"| {d} | {r['sft']:.3f} | {r['expert']:.3f} ({r['expert_gain']:+.3f}) | "
                     f"{r['student']:.3f} ({kept(r['student_kept'])}) | {r['final']:.3f} ({kept(r['final_kept'])}) |")
    if mtp:
        lines += ["", f"| MTP ({mtp['prompts']} held-out prompts, {mtp['k']} drafts, greedy) | mean accepted drafts "
                  "per step | tokens per step | acceptance per draft position |", "|---|---|---|---|"]
        for name, label in (("before", "before the phase (module 1 trained, 2-3 untrained)"),
                            ("after_clone", "after cloning module 1 into 2 and 3"),
                            ("after", "after joint training")):
            r = mtp[name]
            lines.append(f"| {label} | {r['mean_accepted']:.3f} | {r['tokens_per_step']:.3f} | "
                         + ", ".join(f"{x:.2f}" for x in r["acceptance_per_position"]) + " |")
    return "\n".join(lines) + "\n"


def write_results(ctx, accuracy: dict) -> str:
    """Write OUT/results.json and OUT/results.md; returns the markdown."""
    items = {d: len(ctx.test[d]) for d in DOMAINS}
    mtp_path = ctx.path("work", "mtp.json")
    mtp = None
    if os.path.isfile(mtp_path):
        with open(mtp_path) as f:
            mtp = json.load(f)
    table = gains(accuracy)
    results = {"stages": list(accuracy), "domains": list(DOMAINS), "items": items, "accuracy": accuracy,
               "gains": table, "mtp": mtp, "stage_seconds": _stage_seconds(ctx, accuracy),
               "settings": asdict(ctx.args)}
    with open(ctx.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    md = markdown(accuracy, items, table, mtp)
    with open(ctx.path("results.md"), "w") as f:
        f.write(md)
    return md
