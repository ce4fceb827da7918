"""Training mechanics every trainer shares: the loop, checkpoints, metrics."""
