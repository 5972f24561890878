"""Math items: the prompt the model sees and the verdict on its completion.

Grading is the RL math reward's (`stepflash.tasks.rewards.math_verifier`): the final answer is extracted
(last \\boxed{}, else an "answer:" line, else the last number; only text after `</think>` counts) and
compared with math_verify, so 1/2, 0.5 and \\frac{1}{2} agree and sets and intervals compare as such.
"""

from __future__ import annotations

from stepflash.evaluation.scoring import Verdict
from stepflash.tasks.rewards.math_verifier import answers_match, extract_answer

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_messages(item: dict) -> list[dict]:
    """Chat messages for a math item (an optional "system" field becomes the system turn)."""
    messages = [{"role": "system", "content": item["system"]}] if item.get("system") else []
    return messages + [{"role": "user", "content": f"{item['problem']}\n\n{INSTRUCTION}"}]


def score_math(item: dict, completion: str) -> Verdict:
    reference = str(item["answer"])
    answer = extract_answer(completion)
    if answer is None:
        return Verdict(False, 0.0, None, "no answer: nothing to extract from the completion")
    if answers_match(answer, reference):
        return Verdict(True, 1.0, answer, "correct")
    return Verdict(False, 0.0, answer, f"wrong answer: got {_short(answer)}, expected {_short(reference)}")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
