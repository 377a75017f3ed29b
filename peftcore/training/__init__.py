"""The one training loop, its batch order, checkpoints and exact resume, and data parallelism."""
