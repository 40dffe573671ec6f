"""Benchmarks: `python -m benchmarks.bench_encoder` and friends."""
