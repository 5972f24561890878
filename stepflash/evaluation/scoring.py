"""What every task's scorer returns (`Verdict`) and how verdicts become numbers (`pass_at_k`, `summarize`).

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on
Code"): with n samples of a problem of which c are correct, the chance that k samples drawn without
replacement contain at least one correct one is 1 - C(n-c, k) / C(n, k). It is computed as a product,
1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the huge binomials. The benchmark's pass@k is the mean
over problems.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Verdict:
    correct: bool  # the item counts as solved
    score: float  # partial credit in [0, 1] (code: fraction of tests passed); 1.0 when correct
    answer: str | None  # what was graded: the extracted answer, the program, the final reply
    reason: str  # one line a person can read: why it passed or failed
    details: dict = field(default_factory=dict)  # task-specific (per-test results, tool calls, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k of the n samples (c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def k_values(n: int) -> list[int]:
    """The k reported for n samples per item: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else ks + [n]


def summarize(verdicts: list[list[Verdict]]) -> dict:
    """Aggregate verdicts[item][sample] into accuracy, pass@k, mean score and counts."""
    if not verdicts:
        return {"items": 0, "samples": 0, "correct": 0, "accuracy": 0.0, "mean_score": 0.0, "pass@1": 0.0}
    n = min(len(v) for v in verdicts)  # pass@k over the samples every item has
    flat = [v for item in verdicts for v in item]
    correct = sum(v.correct for v in flat)
    out = {
        "items": len(verdicts),
        "samples": len(flat),
        "samples_per_item": n,
        "correct": correct,
        "items_solved": sum(any(v.correct for v in item) for item in verdicts),
        "accuracy": correct / len(flat),
        "mean_score": sum(v.score for v in flat) / len(flat),
    }
    for k in k_values(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(v.correct for v in item[:n]), k) for item in verdicts) / len(verdicts)
    reasons = Counter(_reason_kind(v.reason) for v in flat if not v.correct)
    out["failures"] = dict(reasons.most_common())
    return out


def _reason_kind(reason: str) -> str:
    """The reason up to its first colon: 'wrong answer', 'tests failed', ... (for a failure histogram)."""
    return reason.split(":", 1)[0].strip()
