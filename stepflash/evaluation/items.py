"""Reading evaluation data: task items and predictions, from JSONL, with one-line errors for bad input.

Item formats (one JSON object per line):
- math: {"problem": str, "answer": str}
- code: {"prompt": str, "tests": [str | {"input": str, "output": str}, ...]}
- tool: {"task": str, "env": str, "goal": {...}, "tools": [OpenAI tool schemas]} (see tool_env.py)
Predictions: one {"completion": ...} or {"completions": [...]} per item line, in the same order.
The built-in sample sets live in stepflash/evaluation/data/{task}.jsonl.
"""

from __future__ import annotations

import os

from stepflash.errors import UserError

TASKS = ("math", "code", "tool")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REQUIRED = {"math": ("problem", "answer"), "code": ("prompt", "tests"), "tool": ("task", "env", "goal")}


def builtin_path(task: str) -> str:
    """The path of the sample set shipped for `task`."""
    check_task(task)
    return os.path.join(DATA_DIR, f"{task}.jsonl")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def read_jsonl(path: str, what: str = "data") -> list[dict]:
    """Objects of a JSONL file, each with its line number under "_line" (read by `stepflash.training.batches`)."""
    from stepflash.training.batches import read_jsonl as read_lines

    return [dict(row, _line=n) for n, row in read_lines(path, what)]


def load_items(task: str, path: str | None = None, limit: int = 0) -> list[dict]:
    """Items of `task` from `path` (the built-in sample set when None), checked for their fields."""
    check_task(task)
    path = path or builtin_path(task)
    items = read_jsonl(path, "data")
    if limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = all), got {limit}")
    items = items[:limit] if limit else items
    for item in items:
        missing = [k for k in REQUIRED[task] if k not in item]
        if missing:
            raise UserError(f"{path}:{item['_line']}: a {task} item needs {', '.join(REQUIRED[task])}; "
                            f"missing {', '.join(missing)}")
        if task == "code" and not (isinstance(item["tests"], list) and item["tests"]):
            raise UserError(f"{path}:{item['_line']}: 'tests' must be a non-empty list")
    if task == "tool":
        from stepflash.tasks.tool_env import check_item

        for item in items:
            check_item(item, where=f"{path}:{item['_line']}")
    return items


def load_predictions(path: str, n_items: int, task: str) -> list[list]:
    """Completions per item: predictions[i] is the list of samples for item i (all items the same count).
    A tool sample is the assistant's replies in order (a list of strings; one string = one reply)."""
    rows = read_jsonl(path, "predictions")
    if len(rows) < n_items:
        raise UserError(f"{path} has {len(rows)} predictions for {n_items} items; give one line per item, in order")
    out = []
    for row in rows[:n_items]:
        where = f"{path}:{row['_line']}"
        if "completions" in row:
            samples = row["completions"]
            if not isinstance(samples, list) or not samples:
                raise UserError(f"{where}: 'completions' must be a non-empty list")
        elif "completion" in row:
            samples = [row["completion"]]
        else:
            raise UserError(f"{where}: expected a 'completion' or 'completions' key")
        out.append([_check_sample(s, task, where) for s in samples])
    counts = {len(s) for s in out}
    if len(counts) > 1:
        raise UserError(f"{path}: every line needs the same number of completions, found {sorted(counts)}")
    return out


def _check_sample(sample, task: str, where: str):
    if isinstance(sample, str):
        return [sample] if task == "tool" else sample
    if task == "tool" and isinstance(sample, list) and all(isinstance(s, str) for s in sample):
        return sample
    kind = "a string or a list of strings (one per assistant turn)" if task == "tool" else "a string"
    raise UserError(f"{where}: a {task} completion must be {kind}")
