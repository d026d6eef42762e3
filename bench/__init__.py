"""Benchmarks of dist-exec (run them as scripts: python bench/bench_throughput.py)."""
