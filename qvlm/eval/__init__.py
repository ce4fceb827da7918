"""Evaluation: reward with a 95% CI (Student's t for every n), KL to the base model (exact or a
bound, labelled), distinct-n, perplexity, top-k mass (:mod:`qvlm.eval.metrics`), and per-token value
maps (:mod:`qvlm.eval.valuemap`)."""
