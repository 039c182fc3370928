"""Running the model: the trainer and its config, checkpoints, torch.distributed, precision,
preemption, the non-finite guard, run logs and learning curves, learning-rate rules, inference.
"""
