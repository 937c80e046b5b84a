"""The foundation (floor 0): data, split and evaluation, batching, the training loop, results, errors.

It imports nothing else of Lumos; every other part builds on it.
"""
