"""The trainer: setup (checks, model, optimizers, resume, data), loop, checkpoints, logging."""
