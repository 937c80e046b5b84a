"""Launchers: the `lumos` CLI, simulation, the method runner, deployment, in-process and local runs."""
