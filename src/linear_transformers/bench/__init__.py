"""Benchmark programs (not tests). Each verifies its results, then times, then writes a CSV, a
table and a plot under results/<name>/. Run `python -m linear_transformers.bench --help`."""
