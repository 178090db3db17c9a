"""Benchmarks that print numbers (`guardloop bench ...`): classify, pool, soak."""
