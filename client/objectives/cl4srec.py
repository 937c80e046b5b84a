"""``cl4srec``: SASRec plus CL4SRec's contrast of random crop / mask / reorder views
(Fed-CL4SRec under FedAvg); the augmentations are drawn from the round's generator."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Context

from lumosrec.client.objectives.base import Objective
from lumosrec.core.data import NodeData
from lumosrec.models.sasrec import SASRec


class CL4SRecObjective(Objective):
    name = "cl4srec"
    model = "cl4srec"
    hyper_keys = {"cl-weight": "cl_weight", "cl-temperature": "temperature"}

    def method_name(self, strategy: str) -> str:
        return "fed-cl4srec" if strategy == "fedavg" else f"{strategy}-cl4srec"

    def prepare(
        self, model: SASRec, node: NodeData, context: Context, rng: np.random.Generator, owner: str = ""
    ) -> dict[str, object]:
        return {"rng": rng}

    def batched_refusal(self, run_config: Mapping) -> str | None:
        """Cohorts train CL4SRec batched: each user's augmentations from its own stream, as alone."""
        return None
