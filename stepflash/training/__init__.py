"""Pre-training, and the training core every training verb shares.

Pre-training (`stepflash train`): data shards (data), the objective (objective), Muon on plain or sharded
parameters (muon) and Muon + AdamW stepped as one (optimizer), MoE balancing (balance), stability
monitors (monitors), the arguments (args), setup (setup) and the loop (loop).

The core, used by pre-training, SFT, the reward model, the MTP phase, the recipe and RL: the learning-rate
schedule (schedule), cross entropy / masked cross entropy / token log-probs (losses), padded and shuffled
batches and JSONL reading (batches), progress lines and peak memory (monitors.StepLog, PeakMemory).
Checkpoints are in `stepflash.checkpoint.run`, the distributed runtime in `stepflash.distributed.runtime`.
"""
