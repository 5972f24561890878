"""Code sandbox throughput, before and after a change: programs (or problems) per second.

    PYTHONPATH=. python benchmarks/sandbox.py [--before GIT_REV] [--rounds 7] [--workers 1 2]

"before" is the sandbox, its boot script and the code verifier as of GIT_REV (read with `git show` into a
temporary package, so both run in this one process); "after" is the working tree. Workloads:
- trivial: `run_python("print(1)")`, a correct program that does nothing;
- asserts10: the RL code reward (`code_reward`) of a correct solution on a 10-assert problem (one sandbox run);
- io10: the RL code reward on a 10-test stdin/stdout problem (ten sandbox runs).
Every call uses a program not seen before (the reward's verdict cache would hide the sandbox). Rounds of
the two versions alternate (before, after, after, before, ...), each round runs a batch of calls from
`workers` threads, and the table shows the best and the median round. The ratio is after/before time per
program (> 1: slower). Prints the load average beside the table: the machine may be shared.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count

FILES = {"sandbox.py": "stepflash/tasks/sandbox.py", "sandbox_boot.py": "stepflash/tasks/sandbox_boot.py",
         "code_verifier.py": "stepflash/tasks/rewards/code_verifier.py"}
ASSERTS = [f"assert add({i}, {2 * i}) == {3 * i}" for i in range(10)]
IO = [{"input": f"{i} {2 * i}\n", "output": f"{3 * i}\n"} for i in range(10)]
_unique = count()


def load_before(rev: str, root: str):
    """(run_python, code_reward) of the sandbox at `rev`, imported as package `sandbox_before`."""
    pkg = os.path.join(root, "sandbox_before")
    os.makedirs(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for name, path in FILES.items():
        text = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
        text = text.replace("from stepflash.tasks.sandbox import", "from sandbox_before.sandbox import")
        with open(os.path.join(pkg, name), "w") as f:
            f.write(text)
    sys.path.insert(0, root)
    sandbox, verifier = (importlib.import_module(f"sandbox_before.{m}") for m in ("sandbox", "code_verifier"))
    return sandbox.run_python, verifier.code_reward


def load_after():
    from stepflash.tasks.rewards.code_verifier import code_reward
    from stepflash.tasks.sandbox import run_python

    return run_python, code_reward


def workloads(run_python, code_reward) -> dict:
    def trivial():
        assert run_python(f"print(1)  # {next(_unique)}").stdout == "1\n"

    def asserts10():
        program = f"```python\ndef add(a, b):\n    return a + b  # {next(_unique)}\n```"
        assert code_reward({"tests": ASSERTS, "timeout_s": 2.0}, program) == 1.0

    def io10():
        program = f"```python\na, b = map(int, input().split())\nprint(a + b)  # {next(_unique)}\n```"
        assert code_reward({"tests": IO, "timeout_s": 2.0}, program) == 1.0
    return {"trivial": (trivial, 8), "asserts10": (asserts10, 4), "io10": (io10, 2)}


def timed_round(fn, calls: int, workers: int) -> float:
    """Seconds per call, `calls` calls spread over `workers` threads."""
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: fn(), range(calls)))
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="382fffb", help="git revision of the old sandbox")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"before": workloads(*load_before(args.before, tmp)), "after": workloads(*load_after())}
        for v in versions.values():  # warm up: imports, the isolation probe, the seccomp filter
            for fn, _ in v.values():
                fn()
        times = {}  # (workload, workers, version) -> [seconds per call per round]
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name in versions["after"]:
                for workers in args.workers:
                    for version in order:
                        fn, calls = versions[version][name]
                        times.setdefault((name, workers, version), []).append(timed_round(fn, calls * workers, workers))
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"on {os.cpu_count()} cores; {args.rounds} rounds; before = {args.before}\n")
    print("| workload | workers | before /s (best) | before /s (median) | after /s (best) | after /s (median) "
          "| time ratio after/before (best) | (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in versions["after"]:
        for workers in args.workers:
            b, a = times[(name, workers, "before")], times[(name, workers, "after")]
            print(f"| {name} | {workers} | {1 / min(b):.2f} | {1 / statistics.median(b):.2f} | {1 / min(a):.2f} "
                  f"| {1 / statistics.median(a):.2f} | {min(a) / min(b):.2f} | "
                  f"{statistics.median(a) / statistics.median(b):.2f} |")

if __name__ == "__main__":
    main()
