"""Tasks and their verifiers, shared by RL (`stepflash rl`) and evaluation (`stepflash eval`).

- `generators`: procedurally generated, verifiable tasks (arithmetic, countdown, code, tool) with a stable
  held-out split;
- `rewards`: the verifiers as `reward(task, completion) -> float` (math, countdown, code tests, tool call);
- `sandbox` (+ `sandbox_boot`, `sandbox_policy`): the kernel-confined process that runs model-written code
  (docs/sandbox.md);
- `tool_env`: the simulated tool environments (key-value store, bank, airline).

Nothing here imports `rl/` or `evaluation/`: both build on it.
"""
