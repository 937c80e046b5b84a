"""Flower ClientApp: local training and evaluation on a node's own users (DESIGN.md §3)."""
