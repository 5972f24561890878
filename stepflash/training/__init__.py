"""Pre-training: data shards (data), the objective (objective), Muon/AdamW and the schedule (optimizer),
MoE balancing (balance), stability monitors (monitors), atomic checkpoints (checkpointing) and the loop
behind `stepflash train` (loop)."""
