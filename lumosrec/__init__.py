"""Lumos core: data, split, evaluation, the training loop, results and the CLI."""
