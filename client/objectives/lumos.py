"""``lumos``: LUMOS's tri-view contrast over the node's own views (:mod:`lumosrec.models.lumos`).

Per node and round: the client-private projection head is restored from ``context.state``
(a fresh one on the node's first round: the process-wide cached model may hold another
virtual client's head), and the views of the node's users are read from its cache or made
(:func:`lumosrec.augment.client_views.client_views`); after training the head goes back to
``context.state``. Neither ever leaves the node. Before a simulation, the launcher makes every
user's views in one process (:meth:`LUMOSObjective.prepare_ahead`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from lumosrec.augment.client_views import (
    SOURCE_MODEL_RETRIEVAL,
    VIEW_SOURCES,
    ViewSettings,
    client_views,
    views_source,
)
from lumosrec.augment.generate import generate_views
from lumosrec.augment.runtime import RuntimeConfig
from lumosrec.client.objectives.base import Objective
from lumosrec.core.data import NodeData, run_data
from lumosrec.models.lumos import LUMOS, UserViews

#: where ``context.state`` keeps the projection head
PRIVATE_KEY = "private-parameters"


class LUMOSObjective(Objective):
    name = "lumos"
    model = "lumos"
    hyper_keys = {
        "lumos-lambda-future": "lambda_future",
        "lumos-lambda-paraphrase": "lambda_paraphrase",
        "lumos-tau": "tau",
        "lumos-counterfactual": "use_counterfactual",
        "lumos-contrastive-rows": "contrastive_rows",
        "lumos-future-targets": "future_target_weight",
        "lumos-future-horizon": "future_horizon",
        "lumos-counterfactual-negatives": "counterfactual_negative_weight",
        "lumos-paraphrase-substitution": "paraphrase_substitution",
    }
    setting_keys = (
        "views",
        "views-dir",
        "views-model",
        "views-backend",
        "views-items",
        "views-llm-users",
        "views-llm-seed",
    )
    choices = {"views": VIEW_SOURCES}
    neutral_keys = ("views-dir", "views-backend")
    later_keys = (
        "lumos-future-targets",
        "lumos-future-horizon",
        "lumos-counterfactual-negatives",
        "lumos-paraphrase-substitution",
        "views-llm-users",
        "views-llm-seed",
    )

    def method_name(self, strategy: str) -> str:
        return "lumos" if strategy == "fedavg" else f"lumos-{strategy}"

    def prepare(
        self, model: LUMOS, node: NodeData, context: Context, rng: np.random.Generator, owner: str = ""
    ) -> dict[str, object]:
        restore_private(model, context, private_key(owner))
        return {"views": node_views(model, node, context)}

    def batched_refusal(self, run_config: Mapping) -> str | None:
        """Cohorts train LUMOS batched but for paraphrase substitution, which changes inputs."""
        if float(run_config["lumos-paraphrase-substitution"]) > 0:
            return "the batched cohort engine has no paraphrase substitution; set lumos-paraphrase-substitution = 0"
        return None

    def batched_inputs(self, model: LUMOS, node: NodeData, context: Context) -> dict[str, object]:
        """The users' views and, with the InfoNCE terms on, their heads (None: a user's first round)."""
        inputs: dict[str, object] = {"views": node_views(model, node, context)}
        if model.config.contrastive:
            keys = [private_key(owner) for owner in _owners(node)]
            inputs["heads"] = [
                context.state.array_records[key].to_torch_state_dict() if key in context.state.array_records else None
                for key in keys
            ]
        return inputs

    def keep_batched_private(self, private: list[dict[str, torch.Tensor]], node: NodeData, context: Context) -> None:
        for owner, head in zip(_owners(node), private):
            context.state.array_records[private_key(owner)] = ArrayRecord({k: v.cpu() for k, v in head.items()})

    def keep_private(self, model: LUMOS, context: Context, owner: str = "") -> None:
        context.state.array_records[private_key(owner)] = ArrayRecord(model.private_state_dict())

    def result_details(self, run_config: Mapping) -> dict:
        """Where the views came from: ``llm``, ``retrieval:text`` or ``retrieval:model-embeddings``."""
        return {"views": views_source(run_data(run_config), ViewSettings.from_config(run_config, {}))}

    def prepare_ahead(self, run_config: Mapping, progress: bool = True) -> dict | None:
        """Every user's views, made in the launching process so that clients only read their
        cache; None for views over the received model (``views = "model"``, catalogs without
        text): they follow the model, so clients remake them every round. With an LLM subset
        (``views-llm-users``) the others' retrieval views first, then the LLM's users: the
        report (returned and in the cache folder) is the LLM's."""
        dataset = run_data(run_config)
        settings = ViewSettings.from_config(run_config, {})
        if views_source(dataset, settings) == SOURCE_MODEL_RETRIEVAL:
            return None
        subset = settings.llm_subset(dataset)
        parts = [(settings, None)]
        if subset is not None:
            others = np.setdiff1d(np.arange(dataset.num_users), subset)
            parts = [(settings.without_llm(), others.tolist()), (settings, subset.tolist())]
        reports = [
            generate_views(
                dataset,
                settings.cache_path(dataset.name).parent,
                part.view_config(),
                RuntimeConfig(model=part.model, backend=part.backend),
                users=users,
                encoder_name=part.encoder,
                progress=progress,
            )
            for part, users in parts
        ]
        return reports[-1]


def node_views(model: LUMOS, node: NodeData, context: Context) -> UserViews:
    """The views of ``node``'s users, from the node's cache (made when missing; catalogs
    without text: retrieval over ``model``'s received item embeddings)."""
    settings = ViewSettings.from_config(context.run_config, context.node_config)
    embeddings = model.item_embedding.weight.detach().cpu().numpy()
    views = client_views(node.dataset, node.users.tolist(), node.split.train, settings, embeddings)
    horizon = model.config.future_horizon
    return UserViews(views, [history[-horizon:] for history in node.split.train] if horizon > 0 else None)


def _owners(node: NodeData) -> list[str]:
    """Whose private parameters each of ``node``'s users trains: its user id, as in the loop."""
    return [str(node.dataset.user_ids[user]) for user in node.users.tolist()]


def private_key(owner: str = "") -> str:
    """Where ``context.state`` keeps the head of the node ("") or of one user of a cohort node."""
    return f"{PRIVATE_KEY}:{owner}" if owner else PRIVATE_KEY


def restore_private(model: LUMOS, context: Context, key: str = PRIVATE_KEY) -> None:
    """The head kept under ``key`` in the node's state; a fresh one the first time."""
    if key in context.state.array_records:
        model.projection.load_state_dict(context.state.array_records[key].to_torch_state_dict())
    else:
        model.reset_private_parameters()
