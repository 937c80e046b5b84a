"""The federation in one process: the ServerApp's round loop and the ClientApp, no messaging.

:class:`InProcessGrid` is a Flower :class:`~flwr.serverapp.Grid` that hands every message
straight to the ClientApp's registered function, with one persistent
:class:`~flwr.app.Context` per node (its ``state`` survives rounds, as on a SuperNode). The
arithmetic is the simulation's: same strategy, sampling, local steps, aggregation and
evaluation, minus Ray, gRPC and the SuperLink. It serves to tune federated settings quickly
(``experiments/sweep_federated.py``) and to separate Flower's messaging cost from the
computation in ``experiments/bench_federated.py``. Node ids are ``1..N`` rather than the
simulation's random ids, so a given seed samples other users than under ``flwr run``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from lumosrec.client.client_app import app as client_app
from lumosrec.launch.app import check_node_count, check_run_config, default_num_nodes, default_run_config
from lumosrec.server.server_app import run_rounds

log = logging.getLogger(__name__)

RUN_ID = 1


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, client_app: ClientApp, run_config: Mapping, num_nodes: int) -> None:
        self._app = client_app
        self._contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={"partition-id": node_id - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id in range(1, num_nodes + 1)
        }
        self._run = Run.create_empty(RUN_ID)
        self._pending: dict[str, Message] = {}
        # The strategies build their instructions with `Message(...)`, which reads the
        # identity of the running ServerApp task.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 0

    @property
    def run(self) -> Run:
        return self._run

    def set_run(self, run: Run) -> None:
        self._run = run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def _deliver(self, message: Message) -> Message:
        # a node gets its own copy, as over the wire: mods change what they receive (SecAgg+'s does),
        # and the strategies send one content object to many nodes (its arrays' bytes are shared)
        message = Message(copy.deepcopy(message.content), metadata=copy.copy(message.metadata))
        try:
            return self._app(message, self._contexts[message.metadata.dst_node_id])
        except Exception as error:  # a failing client becomes an error reply, as on a SuperNode
            log.warning("node %d raised %r", message.metadata.dst_node_id, error)
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(error)), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(len(self._pending) + 1)
            self._pending[message_id] = self._deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(message_id) for message_id in message_ids if message_id in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._deliver(message) for message in messages]


def run_in_process(overrides: Mapping[str, object], client: ClientApp = client_app) -> dict:
    """Run the federated app in this process and return its ``result.json``.

    ``overrides`` replace values of ``[tool.flwr.app.config]`` as in
    :func:`lumosrec.launch.simulate.simulate`; one node per ``users-per-client`` users. ``client``
    replaces Lumos's ClientApp, e.g. by one whose nodes misbehave (robustness experiments).
    """
    run_config = check_run_config(overrides, default_run_config())
    run_config["out-dir"] = str(Path(str(run_config["out-dir"])).resolve())
    num_nodes = default_num_nodes(run_config)
    check_node_count(run_config, num_nodes)
    grid = InProcessGrid(client, run_config, num_nodes)
    return run_rounds(grid, Context(RUN_ID, 0, {}, RecordDict(), run_config))
