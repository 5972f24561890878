"""RL post-training: MIS-PO and baseline losses, GAE with truncation bootstrapping, the critic, rollouts and
the trainer (`stepflash rl`). The tasks and their verifiable rewards live in `stepflash.tasks` (shared with
`stepflash eval`); the preference reward model in `stepflash.posttrain`.

Everything here is engine-independent and pure where it can be: the losses take per-token tensors
`[batch, seq]` aligned with the generated tokens (see `losses.py` and `advantages.py`).
"""

from stepflash.rl.advantages import gae, value_loss, whiten
from stepflash.rl.losses import grpo_advantages, kl_k3, kl_penalty, mispo_loss, mispo_masks, ppo_clip_loss, reduce_loss
from stepflash.training.losses import token_logprobs

__all__ = ["gae", "value_loss", "whiten", "grpo_advantages", "kl_k3", "kl_penalty", "mispo_loss", "mispo_masks",
           "ppo_clip_loss", "reduce_loss", "token_logprobs"]

