"""Math reward: extract the final answer of a completion and check it against the reference.

Extraction, in order of trust: the last `\\boxed{...}` (or `\\fbox{...}`), the last "Answer: ..." /
"the answer is ..." line, the last number in the text. The comparison is `math_verify` (parse both sides to
sympy, then verify), so `1/2`, `0.5` and `\\frac{1}{2}` agree, `\\{1,2\\}` equals `\\{2,1\\}`, and intervals
keep their open/closed ends. Anything unparsable scores 0; nothing raises. math_verify guards parsing with
SIGALRM timeouts, which work only in the main thread; elsewhere the timeouts are off and the input length
is capped instead.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from stepflash.errors import UserError
from stepflash.tasks.rewards import strip_reasoning, task_field

MAX_ANSWER_CHARS = 400  # longer "answers" are not answers, and sympy on them can take very long
_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...} with balanced braces, in order."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1])
    return out


def extract_answer(completion: str, boxed_only: bool = False) -> str | None:
    """The final answer string of a completion, or None when there is none. `boxed_only`: only a
    \\boxed{} answer counts (no "answer is" line, no last number)."""
    text = strip_reasoning(completion)
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    if boxed_only:
        return None
    lines = _ANSWER_LINE.findall(text)
    if lines:
        answer = lines[-1].strip().rstrip(".").strip()
        return answer.strip("$ ").strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").replace(" ", "") if numbers else None


def _normalize(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$").rstrip(".")


def _parse(s: str, timeout: int | None):
    from math_verify import parse

    for form in (f"${s}$", s):
        parsed = parse(form, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


def answers_match(predicted: str, reference: str) -> bool:
    """Does the predicted answer string equal the reference mathematically? Never raises."""
    if not predicted or len(predicted) > MAX_ANSWER_CHARS:
        return False
    if _normalize(predicted) == _normalize(reference):
        return True
    try:
        from math_verify import verify

        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold, pred = _parse(reference, timeout), _parse(predicted, timeout)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math_verify and sympy raise all kinds of errors on odd input
        return False


def math_reward(prompt: Any, completion: str) -> float:
    """1.0 when the completion's final answer equals the task's reference answer, else 0.0.
    A task whose prompt asks for \\boxed{} gets credit only for a boxed answer: with the lenient fallbacks
    RL learned to stop mid-reasoning on a number that happened to match ("0 + 3 = " scored 1)."""
    reference = task_field(prompt, "answer")
    if reference is None:
        raise UserError("a math task needs a reference 'answer'")
    asks_boxed = "\\boxed" in str(task_field(prompt, "prompt") or "")
    answer = extract_answer(completion, boxed_only=asks_boxed)
    return 1.0 if answer is not None and answers_match(answer, str(reference)) else 0.0
