"""Benchmark scripts of accuquant-pl, each run from the repository root as ``python -m benchmarks.<name>``."""
