"""Evaluation: `stepflash eval`, scoring a checkpoint or given completions on math, code and tool-use items.

- items.py: JSONL loading (task items, predictions) and the built-in sample sets in data/;
- math_eval.py / code_eval.py: prompts and verdicts, with the same verifiers as RL (tasks/rewards);
- tool_eval.py: multi-turn episodes against the simulated tool environments of tasks/tool_env.py;
- scoring.py: the Verdict every scorer returns, accuracy and the unbiased pass@k estimator;
- generation.py: a checkpoint + tokenizer + chat template + Engine as a batched policy;
- harness.py: the `eval` verb, which composes the above and writes results.json and records.jsonl.
"""

from stepflash.evaluation.code_eval import score_code
from stepflash.evaluation.items import TASKS, builtin_path, load_items, load_predictions
from stepflash.evaluation.math_eval import score_math
from stepflash.evaluation.scoring import Verdict, pass_at_k, summarize
from stepflash.tasks.tool_env import ENVS, ToolEnv
from stepflash.evaluation.tool_eval import Episode, run_episodes, score_episode, start_episode

__all__ = ["ENVS", "TASKS", "Episode", "ToolEnv", "Verdict", "builtin_path", "load_items", "load_predictions",
           "pass_at_k", "run_episodes", "score_code", "score_episode", "score_math", "start_episode", "summarize"]
