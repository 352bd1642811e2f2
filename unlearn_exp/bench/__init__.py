"""Benchmark scripts (not tests): ``python -m unlearn_exp.bench.<name>``."""
