"""A progress bar over an Engine's work, for the verbs that generate a lot in one call (eval, RL rollouts).

`Engine.generate` runs `engine.step()` until every request has finished; inside
`with generation_progress(engine, total, "eval")` each step's outputs advance a tqdm bar by the sequences
that finished, with the decode rate as its postfix. The engine is only observed: its results are the same
with or without the bar, and its own `step` is back in place when the block ends.

The bar goes to stderr, on the main rank only (RANK unset or 0); by default only when stderr is a
terminal (tqdm's `disable=None`), so logs and pipes get no carriage-return noise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from stepflash.threads import is_main_rank


@contextmanager
def generation_progress(engine, total: int, desc: str, enabled: bool | None = None,
                        leave: bool = True) -> Iterator[tqdm]:
    """Count the sequences `engine` finishes inside the block on a bar of `total`. enabled: True/False, or
    None for "when stderr is a terminal"; leave=False erases the bar at the end (per-step rollouts)."""
    bar = tqdm(total=total, desc=desc, unit="seq", leave=leave,
               disable=True if not is_main_rank() else (None if enabled is None else not enabled))
    own = vars(engine).get("step")  # set when another bar already observes this engine
    step = engine.step
    tokens, t0 = 0, time.perf_counter()

    def observed_step():
        nonlocal tokens
        outputs = step()
        tokens += sum(len(o.new_token_ids) for o in outputs)
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)
        bar.update(sum(1 for o in outputs if o.finished))
        return outputs

    engine.step = observed_step
    try:
        yield bar
    finally:
        if own is None:
            del engine.step  # the class's method again
        else:
            engine.step = own
        bar.close()
