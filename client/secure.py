"""The node's side of secure aggregation: Flower's ``secaggplus_mod`` around this ClientApp.

Flower's SecAgg+ mod masks a legacy ``FitRes``; this ClientApp speaks ``arrays``/``config``
records. :func:`secure_aggregation_mod` routes a SecAgg+ message through ``secaggplus_mod`` and
translates in between: the instructions (``FitIns``) become the ClientApp's training or evaluation
message, and its reply becomes the ``FitRes`` the mod masks:

* training: the update (the trained model minus the received one) and the example count the
  reply states (the weight; rounded under ``hide-history-length``); client-side defences (local DP,
  the item-row defence) have already acted on it;
* evaluation: the rank histograms and the user count, divided by the server's power-of-two scale
  so that they quantize exactly, with weight 1.

Every other message passes through untouched. The server's side is :mod:`lumosrec.server.secure`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from lumosrec.core.errors import LumosError

#: the config keys a secure exchange sends along with the model
SECURE_KEY = "lumos-secure"  # "train" or "evaluate"
NAMES_KEY = "lumos-array-names"  # the model's array names, in the order of the legacy parameters
SCALE_KEY = "lumos-histogram-scale"  # evaluation: the power of two the counts are divided by


def secure_metric_names() -> list[str]:
    """The evaluation metrics, in the order a node sends them as arrays."""
    # imported here: core.evaluation imports torch, which the ClientApp's key and share
    # messages should not pay for (lumosrec.client.client_app)
    from lumosrec.core.evaluation import REPLY_METRICS

    return sorted(REPLY_METRICS)


#: what a node evaluates: the received model's content -> its reply's content (rank histograms)
Evaluation = Callable[[RecordDict, Context], RecordDict]


def secure_aggregation_mod(evaluation: Evaluation) -> Mod:
    """The mod that runs SecAgg+ messages through Flower's ``secaggplus_mod`` and passes every
    other message on. SecAgg+ masks training messages only, so a secure evaluation arrives as
    one; ``evaluation`` answers it (mods wrap each handler alone: the evaluate handler is out of reach)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        exchange = functools.partial(_legacy_exchange, call_next=call_next, evaluation=evaluation)
        return secaggplus_mod(msg, context, exchange)

    return mod


def _legacy_exchange(msg: Message, context: Context, call_next: ClientAppCallable, evaluation: Evaluation) -> Message:
    """The masked stage's instructions as this ClientApp's message, its reply as a legacy FitRes."""
    # the FitIns records read directly: the legacy FitIns cannot hold a config's lists
    config = dict(msg.content.config_records["fitins.config"])
    names, purpose = list(config.pop(NAMES_KEY)), str(config.pop(SECURE_KEY))
    received = [bytes_to_ndarray(array.data) for array in msg.content.array_records["fitins.parameters"].values()]
    content = RecordDict(
        {
            "arrays": ArrayRecord({name: Array(array) for name, array in zip(names, received, strict=True)}),
            "config": ConfigRecord({key: value for key, value in config.items() if key != SCALE_KEY}),
        }
    )
    if purpose == "evaluate":
        result = _histograms(evaluation(content, context), int(config[SCALE_KEY]))
    else:
        reply = call_next(Message(content, metadata=copy.copy(msg.metadata)), context)
        if reply.has_error():
            raise LumosError(f"the ClientApp failed on a secure training message: {reply.error.reason}")
        result = _update(reply.content, names, received)
    return Message(compat.fitres_to_recorddict(result, keep_input=False), reply_to=msg)


def _update(content: RecordDict, names: list[str], received: list[np.ndarray]) -> FitRes:
    """The trained model's change and weight (a cohort none of whose users was drawn: none, 0)."""
    metrics = content["metrics"]
    examples = int(metrics["num-examples"])
    if examples == 0:
        changes = [np.zeros_like(array) for array in received]
    else:
        trained = content["arrays"]
        changes = [trained[name].numpy() - start for name, start in zip(names, received, strict=True)]
    plain = {key: value for key, value in metrics.items() if key != "num-examples"}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(changes), examples, plain)


def _histograms(content: RecordDict, scale: int) -> FitRes:
    metrics = content["metrics"]
    arrays = [np.atleast_1d(np.asarray(metrics[name], dtype=np.float64)) / scale for name in secure_metric_names()]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})
