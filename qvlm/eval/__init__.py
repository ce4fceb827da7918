"""Evaluation: reward with a 95% CI, KL to the base model, distinct-n, perplexity
(:mod:`qvlm.eval.metrics`), and per-token value maps (:mod:`qvlm.eval.valuemap`)."""
