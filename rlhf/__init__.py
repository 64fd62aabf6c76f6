"""RLHF: reward models, DPO, PPO and GRPO on the framework's training loop (being built; the losses
and advantage estimators are in `rlhf.losses`)."""
