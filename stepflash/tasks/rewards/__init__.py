"""Rewards: one interface, `reward(prompt, completion) -> float`, and a plain dict `REWARDS` of them.

`prompt` is the task record, not only its text, because a verifier needs the reference too: a
`stepflash.tasks.generators.Task`, or a dict with the same keys ("prompt", "answer", "tests", ...); `task_field`
reads either. `completion` is the generated text; when it holds a reasoning block, only what follows the
last `</think>` is graded (`strip_reasoning`). Rewards never raise on a malformed completion (it scores 0);
they raise only when the task itself is unusable (no reference) or the sandbox cannot run.

Built in: "math" (final answer vs reference with math_verify), "arithmetic" (the same), "code" (tests in the
sandbox, fraction passed), "countdown" (expression check), "tool_call" (the reply's one XML tool call equals
the expected function and arguments). "preference" needs a trained reward model, so it
is registered by the caller: `REWARDS["preference"] = PreferenceReward(rm, tokenizer)`.
Domains are mixed by sampling tasks, not by summing rewards (SPEC section 7).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from stepflash.errors import UserError

THINK_END = "</think>"
RewardFn = Callable[[Any, str], float]


def task_field(prompt: Any, name: str, default: Any = None) -> Any:
    """`name` of a task record: an attribute, a mapping key, or an entry of its `meta` dict."""
    if isinstance(prompt, Mapping):
        if name in prompt:
            return prompt[name]
        meta = prompt.get("meta") or {}
    else:
        if getattr(prompt, name, None) is not None:
            return getattr(prompt, name)
        meta = getattr(prompt, "meta", None) or {}
    return meta.get(name, default) if isinstance(meta, Mapping) else default


def strip_reasoning(completion: str) -> str:
    """The answer part of a completion: the text after the last `</think>` (all of it when there is none)."""
    head, sep, tail = completion.rpartition(THINK_END)
    return tail if sep else completion


from stepflash.tasks.rewards.code_verifier import code_reward  # noqa: E402
from stepflash.tasks.rewards.math_verifier import math_reward  # noqa: E402
from stepflash.tasks.rewards.countdown import countdown_reward  # noqa: E402
from stepflash.tasks.rewards.tool_call import tool_call_reward  # noqa: E402

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "arithmetic": math_reward,
    "code": code_reward,
    "countdown": countdown_reward,
    "tool_call": tool_call_reward,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


__all__ = ["REWARDS", "RewardFn", "get_reward", "strip_reasoning", "task_field", "code_reward", "math_reward",
           "countdown_reward", "tool_call_reward"]
