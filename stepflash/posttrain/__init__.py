"""Post-training after pre-training and beside RL: supervised fine-tuning (`sft`), the preference reward model
(`reward_model`, `preference`), the MTP phase that clones and trains MTP modules 2-3 (`mtp_phase`), and the
report's specialise-then-consolidate recipe (`recipe*`: RL domain experts, self-distillation into one
student, a final MIS-PO stage). It builds on `training/`, `rl/` and `evaluation/`; nothing imports it but
the CLI.
"""
