"""``sasrec``: SASRec's next-item loss alone (FedAvg-SASRec under FedAvg)."""

from __future__ import annotations

from collections.abc import Mapping

from lumosrec.client.objectives.base import Objective


class SASRecObjective(Objective):
    name = "sasrec"
    model = "sasrec"

    def batched_refusal(self, run_config: Mapping) -> str | None:
        return None

    def method_name(self, strategy: str) -> str:
        return f"{strategy}-sasrec"
