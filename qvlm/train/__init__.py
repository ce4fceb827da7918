"""Training mechanics every trainer shares, each usable alone (offline loop or an online trainer's
``rollout -> targets -> epochs of minibatches``): ``optim`` (optimiser, one optimiser step),
``checkpoint`` (resumable state, atomic), ``metrics`` (jsonl + TensorBoard, stats as floats),
``rng`` (seeding, every RNG state), ``distributed`` (which process writes), ``loop`` (the offline loop)."""
