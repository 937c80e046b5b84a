"""Experiment runners and benchmarks (scripts that print numbers and write JSON)."""
