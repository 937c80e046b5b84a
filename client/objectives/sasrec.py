"""``sasrec``: SASRec's next-item loss alone (FedAvg-SASRec under FedAvg)."""

from __future__ import annotations

from lumosrec.client.objectives.base import Objective


class SASRecObjective(Objective):
    name = "sasrec"
    model = "sasrec"
    batched_cohorts = True

    def method_name(self, strategy: str) -> str:
        return f"{strategy}-sasrec"
