"""Flower ServerApp: aggregation strategies, checkpoints, results (DESIGN.md §3)."""
