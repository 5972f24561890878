"""RL post-training: MIS-PO and baseline losses, GAE with truncation bootstrapping, critic and reward model,
verifiable rewards (math, code in a sandbox, countdown, preference) and procedurally generated tasks.

Everything here is engine-independent and pure where it can be: the losses take per-token tensors
`[batch, seq]` aligned with the generated tokens (see `losses.py` and `advantages.py`).
"""

from stepflash.rl.advantages import gae, value_loss, whiten
from stepflash.rl.losses import (grpo_advantages, kl_k3, kl_penalty, mispo_loss, mispo_masks, ppo_clip_loss,
                                 reduce_loss, token_logprobs)

__all__ = ["gae", "value_loss", "whiten", "grpo_advantages", "kl_k3", "kl_penalty", "mispo_loss", "mispo_masks",
           "ppo_clip_loss", "reduce_loss", "token_logprobs"]


def __getattr__(name):
    # Rewards, tasks and models load on first use: `import stepflash.rl` stays light.
    if name in ("REWARDS", "get_reward"):
        from stepflash.rl import rewards

        return getattr(rewards, name)
    if name in ("Task", "make_tasks", "TASKS"):
        from stepflash.rl import tasks

        return getattr(tasks, name)
    if name in ("CriticModel", "ValueHead"):
        from stepflash.rl import critic

        return getattr(critic, name)
    if name in ("RewardModel", "bt_loss"):
        from stepflash.rl import reward_model

        return getattr(reward_model, name)
    raise AttributeError(f"module 'stepflash.rl' has no attribute {name!r}")
