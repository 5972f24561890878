"""The recipe's three domains as procedural tasks posed exactly as `stepflash eval` poses its items.

Every domain has a task family a 1-5M-parameter model can learn on CPU (`stepflash.tasks.generators`):
- math: small arithmetic expressions (`arithmetic_tasks`), scored by the math verifier;
- code: one-line Python functions with assert tests (`code_tasks`), scored in the sandbox;
- tool: one request against the harness's kv or bank env that needs one tool call (`tool_tasks`).

A task's prompt is the user turn the eval harness renders for the matching item (math: the problem plus
the harness's boxed-answer instruction; code: the statement plus its code-block instruction; tool: the
request, with the task's system turn and tool schemas), so RL rollouts, SFT data and the held-out eval
see the same text. `eval_item` writes a held-out task in the harness's JSONL format (math
{"problem", "answer"}, code {"prompt", "tests"}, tool an episode item {"task", "env", "init", "goal",
"tools"}); `conversation` turns a task and its reference into an SFT conversation (tool: the call, the
env's real result, and the reference reply).
"""

from __future__ import annotations

import json

from stepflash.chat import chat_template_source
from stepflash.evaluation.code_eval import code_messages
from stepflash.evaluation.math_eval import math_messages
from stepflash.tasks.generators import Task, arithmetic_tasks, code_tasks, tool_tasks

DOMAINS = ("math", "code", "tool")
MATH_OPTIONS = {"digits": (1, 1), "ops": "+", "terms": (3, 3)}  # "7 + 9 + 4": 1000 expressions, 900 train
CODE_TEMPLATES = ("add_const", "scale_sum", "remove_char", "count_multiples")
TOOL_MAX_TURNS = 3  # the call, then the final reply (and one spare)


def compact_chat_template() -> str:
    """The Step 3.5 template with its ~200-token tool preamble (the "# Tools" intro and the call-format
    instructions) cut to the bare <tools> block: the demo model has a 512-token context and learns the
    call format from data. Turns, think blocks, tool-call XML and tool_response turns are unchanged."""
    return chat_template_source(tool_instructions=False)


def domain_tasks(domain: str, n: int, split: str, seed: int = 0, tool_distractors: int = 0) -> list[Task]:
    """n tasks of a domain's split, their prompts in the eval harness's wording (tool tasks offer the needed
    tool and `tool_distractors` others)."""
    if domain == "math":
        out = []
        for t in arithmetic_tasks(n, seed=seed, split=split, **MATH_OPTIONS):
            problem = f"Compute {t.meta['expression']}."
            prompt = math_messages({"problem": problem})[-1]["content"]
            out.append(Task(prompt, t.answer, "arithmetic", {**t.meta, "problem": problem}, key=t.key))
        return out
    if domain == "code":
        out = []
        for t in code_tasks(n, seed=seed, split=split, templates=CODE_TEMPLATES):
            prompt = code_messages({"prompt": t.meta["statement"], "tests": t.tests})[-1]["content"]
            out.append(Task(prompt, t.answer, "code", t.meta, tests=t.tests, key=t.key))
        return out
    if domain == "tool":
        return tool_tasks(n, seed=seed, split=split, distractors=tool_distractors)
    raise ValueError(f"unknown domain {domain!r}")


def eval_item(domain: str, task: Task) -> dict:
    """A held-out task as one line of the harness's JSONL for `domain`."""
    if domain == "math":
        return {"problem": task.meta["problem"], "answer": task.answer}
    if domain == "code":
        return {"prompt": task.meta["statement"], "tests": task.tests, "solution": task.answer}
    m = task.meta
    return {"task": task.prompt, "env": m["env"], "init": m["init"], "goal": m["goal"], "tools": m["tools"],
            "system": m["system"], "max_turns": TOOL_MAX_TURNS, "reference_calls": [m["call"]],
            "reference_answer": m["final"]}


def write_eval_set(path: str, domain: str, tasks: list[Task]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(eval_item(domain, t), ensure_ascii=False) + "\n")


def tool_result(task: Task) -> str:
    """What the env answers to the task's expected call (the tool turn of a reference conversation)."""
    from stepflash.tasks.tool_env import ENVS

    m = task.meta
    return ENVS[m["env"]](m["init"]).call(m["call"]["name"], m["call"]["arguments"])


def math_steps(expression: str) -> str:
    """Left-to-right working of a + and - expression, one operation a line: "7 - 9 = -2\\n-2 + 4 = 2"."""
    parts = expression.split()
    value, lines = int(parts[0]), []
    for op, x in zip(parts[1::2], parts[2::2]):
        new = value + int(x) if op == "+" else value - int(x)
        lines.append(f"{value} {op} {x} = {new}")
        value = new
    return "\n".join(lines)


def conversation(domain: str, task: Task, reply: str | None = None) -> dict:
    """An SFT conversation for a task: its prompt and the reference answer (or `reply`, a sampled and
    verified completion, for math and code; for tool, `reply` is the verified first turn)."""
    from stepflash.rl.rollout import task_messages

    messages, tools = task_messages(task)
    if reply is not None and domain != "tool":
        return {"messages": messages + [{"role": "assistant", "content": reply}]}
    if domain == "math":
        answer = {"role": "assistant", "reasoning_content": math_steps(task.meta["expression"]),
                  "content": f"\\boxed{{{task.answer}}}"}
        return {"messages": messages + [answer]}
    if domain == "code":
        return {"messages": messages + [{"role": "assistant", "content": f"```python\n{task.answer}```"}]}
    call = task.meta["call"]
    first = {"role": "assistant", "content": reply} if reply is not None else {
        "role": "assistant", "reasoning_content": f"Call {call['name']}.", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]}
    rest = [{"role": "tool", "content": tool_result(task)}, {"role": "assistant", "content": task.meta["final"]}]
    return {"messages": messages + [first] + rest, "tools": tools}
