"""Flower ClientApp: local training and full-ranking evaluation on a node's own users.

The handlers answer with :mod:`lumosrec.client.local` (the model, the local objective, the
node's data); only the shared backbone's arrays and scalar metrics leave the node. The mods wrap
every message: secure aggregation outermost (:mod:`lumosrec.client.secure`), so that it masks
what the client-side defences inside it (:mod:`lumosrec.client.privacy`) made of the reply.

This module imports neither torch nor the model: a deployed SuperNode starts a fresh ClientApp
process for every message, and SecAgg+'s key, share and unmasking messages need neither. They
then cost a Python and Flower start (about 1 s) instead of also torch's (3 s on an idle core,
over 10 s on a loaded one); only the messages that train or evaluate import
:mod:`lumosrec.client.local`.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from lumosrec.client.secure import secure_aggregation_mod


def _rank_histograms(content: RecordDict, context: Context) -> RecordDict:
    from lumosrec.client.local import rank_histograms  # torch: see the module's docstring

    return rank_histograms(content, context)


def _local_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    from lumosrec.client.privacy import local_dp_mod  # torch: see the module's docstring

    return local_dp_mod(msg, context, call_next)


app = ClientApp(mods=[secure_aggregation_mod(_rank_histograms), _local_dp_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's users (:func:`lumosrec.client.local.train_reply`)."""
    from lumosrec.client.local import train_reply  # torch: see the module's docstring

    return Message(train_reply(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Reply with the received model's rank histograms on this node's users
    (:func:`lumosrec.client.local.rank_histograms`)."""
    return Message(_rank_histograms(msg.content, context), reply_to=msg)
