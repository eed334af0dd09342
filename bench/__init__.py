"""Benchmarks of the stages against baselines run side by side: ``make bench`` (see bench/run.py)."""
