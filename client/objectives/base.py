"""The interface of a local objective: what a client minimises, declared in one place.

Each module of :mod:`lumosrec.client.objectives` holds one :class:`Objective` and is
registered there under its run-config value (``objective = "..."``). The ClientApp, the
ServerApp and the launchers ask the registry; nothing else knows an objective by name.
An objective declares:

* the run-config keys it reads: those that set its model's hyper-parameters
  (:attr:`Objective.hyper_keys`) and those of its per-node preparation
  (:attr:`Objective.setting_keys`); their defaults are in ``[tool.flwr.app.config]``,
  which Flower reads (a test keeps the two in step);
* which of them leave the result unchanged (:attr:`Objective.neutral_keys`: paths,
  backends), so that every other one makes a checkpoint incompatible;
* its per-node preparation (:meth:`Objective.prepare`): the inputs its loss takes for the
  node's users (views, random draws), passed to ``model.loss`` by keyword, and the
  client-private parameters it restores from ``context.state`` (and saves there with
  :meth:`Objective.keep_private`);
* what a launcher can prepare for all nodes ahead of a simulation
  (:meth:`Objective.prepare_ahead`, e.g. every user's views);
* whether cohort nodes may train its users together (:meth:`Objective.batched_refusal`,
  :mod:`lumosrec.client.cohort`), with which inputs (:meth:`Objective.batched_inputs`) and where
  the users' private parameters go afterwards (:meth:`Objective.keep_batched_private`);
* how results name a run that trains it (:meth:`Objective.method_name`,
  :meth:`Objective.result_details`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from flwr.app import Context

from lumosrec.core.data import NodeData
from lumosrec.core.runconfig import model_sizes
from lumosrec.models.factory import build_model
from lumosrec.models.sasrec import SASRec


class Objective:
    """A local objective; subclasses set the class attributes and override what they need."""

    #: the run-config value of ``objective``
    name: ClassVar[str]
    #: the model it trains, a name of :data:`lumosrec.models.factory.MODELS`
    model: ClassVar[str]
    #: run-config key -> the hyper-parameter of the model it sets
    hyper_keys: ClassVar[Mapping[str, str]] = {}
    #: further run-config keys its per-node preparation reads
    setting_keys: ClassVar[tuple[str, ...]] = ()
    #: allowed values of those of its keys that take one of a fixed set
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: its keys whose value does not change what is trained (a checkpoint made with another resumes)
    neutral_keys: ClassVar[tuple[str, ...]] = ()
    #: its keys added after checkpoints were first written, whose 0 means "off": they enter the
    #: fingerprint only when on, so that a checkpoint written before them still resumes
    later_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every run-config key this objective reads beyond the shared ones."""
        return (*self.hyper_keys, *self.setting_keys)

    @property
    def fingerprint_keys(self) -> tuple[str, ...]:
        """Its keys that must match for a checkpoint to be resumed."""
        return tuple(key for key in self.keys if key not in self.neutral_keys)

    def method_name(self, strategy: str) -> str:
        """The name results carry for a run of this objective under the aggregation ``strategy``."""
        raise NotImplementedError

    def hyper(self, run_config: Mapping) -> dict:
        """The hyper-parameters of this objective's model that the run config sets."""
        return {field: run_config[key] for key, field in self.hyper_keys.items() if key in run_config}

    def build_model(self, run_config: Mapping, num_items: int) -> SASRec:
        """The model a client trains: the backbone's sizes and this objective's hyper-parameters."""
        return build_model(self.model, num_items, **model_sizes(run_config), **self.hyper(run_config))

    def prepare(
        self, model: SASRec, node: NodeData, context: Context, rng: np.random.Generator, owner: str = ""
    ) -> dict[str, object]:
        """Restore the private parameters of ``owner`` into ``model`` and return the keyword inputs of
        ``model.loss`` for this round (``rng`` is the round's generator, which also shuffles).
        ``owner`` is "" for the node itself, a user's id for a user of a cohort node."""
        return {}

    def batched_refusal(self, run_config: Mapping) -> str | None:
        """Why cohort nodes cannot train this objective's users together under ``run_config``
        (:func:`lumosrec.client.cohort.train_batched`); None when they can."""
        return f"the batched cohort engine does not train the {self.name} objective"

    def batched_inputs(self, model: SASRec, node: NodeData, context: Context) -> dict[str, object]:
        """The keyword inputs of :func:`lumosrec.client.cohort.train_batched` for ``node``'s users
        (row ``k`` for user ``k``) when they train together."""
        return {}

    def keep_private(self, model: SASRec, context: Context, owner: str = "") -> None:
        """Save the private parameters of ``owner`` in ``context.state`` after training (never sent)."""

    def keep_batched_private(self, private: list[dict[str, torch.Tensor]], node: NodeData, context: Context) -> None:
        """Save each user's private parameters after its cohort trained batched (``private[k]``:
        ``node``'s user ``k``, :attr:`lumosrec.client.cohort.CohortUpdate.private`)."""

    def result_details(self, run_config: Mapping) -> dict:
        """What a run's results say about this objective's inputs beyond the method name."""
        return {}

    def prepare_ahead(self, run_config: Mapping, progress: bool = True) -> dict | None:
        """Work a launcher can do for every node at once before a simulated federation (one
        process instead of one per client); returns its report, None when there is none."""
        return None
