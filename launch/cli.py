"""The ``lumos`` command line.

Subcommands::

    lumos train --method centralized-sasrec --data synthetic --out runs/demo
    lumos data stats PATH
    lumos data download ml-100k
    lumos data synthetic --out DIR
    lumos simulate --data synthetic --rounds 10 --out runs/fed [--objective lumos]
    lumos run --method lumos --data ml-100k --out runs/lumos-ml100k
    lumos views generate --data ml-100k --out runs/views-ml100k
    lumos views inspect --data ml-100k --out runs/views-ml100k --user-id 1

User mistakes (bad paths, malformed files, unknown options, no network) end with one
``lumos: error: ...`` line and exit status 2, never a traceback. Ctrl-C or SIGTERM stops
``simulate`` and ``deploy local`` with every process they started, one line and exit status 130
(SIGINT) or 143 (SIGTERM); the same command resumes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lumosrec.core import download as downloads
from lumosrec.core.data import SYNTHETIC, resolve_data
from lumosrec.core.errors import ConfigError, LumosError
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder

if TYPE_CHECKING:
    from lumosrec.augment.runtime import RuntimeConfig
    from lumosrec.augment.semantic import SemanticConfig

log = logging.getLogger("lumos")


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from lumosrec.launch.centralized import CENTRALIZED_METHODS

    parser = subparsers.add_parser("train", help="train and evaluate one method centrally")
    parser.add_argument(
        "--method",
        choices=sorted(CENTRALIZED_METHODS),
        help="centralized-sasrec (default), centralized-cl4srec or sracl",
    )
    # "strategy" now means only the server's aggregation rule; the old spelling still works
    parser.add_argument("--strategy", dest="legacy_method", choices=sorted(CENTRALIZED_METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--data", default=SYNTHETIC, help="'synthetic', a downloaded dataset name, or a path")
    parser.add_argument("--items", help="items.csv to use with a sequences file")
    parser.add_argument("--out", required=True, help="run directory (config, metrics, model, result)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping usually ends sooner")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--num-heads", type=int)
    parser.add_argument("--inner-size", type=int)
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--cl-weight", type=float, help="CL4SRec lambda")
    parser.add_argument("--temperature", type=float, help="tau of CL4SRec and SRA-CL")
    _add_sracl_options(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_resumable(_train))


def _add_sracl_options(parser: argparse.ArgumentParser) -> None:
    from lumosrec.augment.neighbours import INDEXES
    from lumosrec.augment.runtime import BACKENDS, DEFAULT_MODEL
    from lumosrec.augment.semantic import RETRIEVALS, SOURCES
    from lumosrec.models.sracl import SYNTHESIZERS

    group = parser.add_argument_group("sracl", "SRA-CL (--method sracl); the flags after --k are its ablations")
    group.add_argument("--alpha", type=float, help="weight of the inter-user contrastive term (default 0.1)")
    group.add_argument("--beta", type=float, help="weight of the intra-user contrastive term (default 0.1)")
    group.add_argument("--k", type=int, default=10, help="semantic neighbours per user and per item")
    group.add_argument("--no-user-cl", action="store_true", help="ablation: alpha = 0")
    group.add_argument("--no-item-cl", action="store_true", help="ablation: beta = 0")
    group.add_argument("--synthesizer", choices=SYNTHESIZERS, help="top1: the hard-rule ablation (nearest user only)")
    group.add_argument("--retrieval", choices=RETRIEVALS, default="semantic", help="random: the non-semantic ablation")
    group.add_argument(
        "--semantic",
        choices=SOURCES,
        default="llm",
        help="raw-text: embed titles instead of LLM summaries (the w/o-LLM ablation)",
    )
    group.add_argument("--index", choices=INDEXES, default="exact", help="approximate: a FAISS HNSW index")
    group.add_argument("--llm-model", default=DEFAULT_MODEL, help="shipped name, .gguf file, model folder or HF id")
    group.add_argument("--llm-backend", choices=BACKENDS, default="auto")
    group.add_argument("--llm-batch", type=int, default=12, help="prompts decoded together")
    group.add_argument("--encoder", help="sentence-transformers model (default all-MiniLM-L6-v2, shipped)")
    group.add_argument(
        "--semantic-dir", help="cache of texts and LLM cost report (default ~/.cache/lumos/semantic/<data>)"
    )


SRACL_HYPER = ("alpha", "beta", "synthesizer")


def check_sracl_flags(args: argparse.Namespace, method: str) -> None:
    """SRA-CL's model flags with another method are a mistake, not something to ignore."""
    if method != "sracl" and (
        args.no_user_cl or args.no_item_cl or any(getattr(args, n) is not None for n in SRACL_HYPER)
    ):
        raise ConfigError(
            "--alpha, --beta, --synthesizer, --no-user-cl and --no-item-cl are SRA-CL's; use them with sracl"
        )


def sracl_settings(args: argparse.Namespace) -> tuple[dict, SemanticConfig, RuntimeConfig]:
    """SRA-CL's model hyper-parameters, semantic side and LLM runtime from ``lumos train`` flags."""
    from lumosrec.augment.runtime import RuntimeConfig
    from lumosrec.augment.semantic import SemanticConfig

    if args.k < 1 or args.llm_batch < 1:
        raise ConfigError("--k and --llm-batch must be at least 1")
    if min(args.alpha or 0.0, args.beta or 0.0) < 0:
        raise ConfigError("--alpha and --beta weigh losses and cannot be negative (0 turns a term off)")
    hyper = {name: getattr(args, name) for name in SRACL_HYPER if getattr(args, name) is not None}
    if args.no_user_cl:
        hyper["alpha"] = 0.0
    if args.no_item_cl:
        hyper["beta"] = 0.0
    semantic = SemanticConfig(
        source=args.semantic,
        retrieval=args.retrieval,
        index=args.index,
        k=args.k,
        folder=args.semantic_dir or "",
        **({"encoder": args.encoder} if args.encoder else {}),
    )
    return hyper, semantic, RuntimeConfig(model=args.llm_model, backend=args.llm_backend, batch_size=args.llm_batch)


def _train_method(args: argparse.Namespace) -> str:
    """``--method``, or the deprecated ``--strategy`` with a line saying so."""
    if args.legacy_method is not None:
        if args.method is not None and args.method != args.legacy_method:
            raise ConfigError(
                f"--method {args.method} and --strategy {args.legacy_method} disagree; give --method only"
            )
        print(
            "lumos: warning: `lumos train --strategy` is deprecated, use --method (a strategy is the server's "
            "aggregation rule)",
            file=sys.stderr,
        )
    return args.method or args.legacy_method or "centralized-sasrec"


def _train(args: argparse.Namespace) -> int:
    from lumosrec.core.training import TrainConfig
    from lumosrec.launch.centralized import result_table, run_centralized

    method = _train_method(args)
    for name in ("max_len", "epochs", "batch_size", "patience"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    dataset = resolve_data(args.data, args.items)
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        max_len=args.max_len,
        seed=args.seed,
        device=args.device,
    )
    hyper_names = ("hidden_size", "num_layers", "num_heads", "inner_size", "dropout", "cl_weight", "temperature")
    hyper = {name: getattr(args, name) for name in hyper_names if getattr(args, name) is not None}
    semantic = runtime = None
    check_sracl_flags(args, method)
    if method == "sracl":
        sracl_hyper, semantic, runtime = sracl_settings(args)
        hyper.update(sracl_hyper)
    log.info("%s on %s: %d users, %d items", method, dataset.name, dataset.num_users, dataset.num_items)
    try:
        result = run_centralized(
            method, dataset, args.out, train, hyper, args.overwrite, not args.quiet, semantic, runtime
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted; config and per-epoch metrics so far are in {args.out}", file=sys.stderr)
        return 130
    print(
        f"\n{method} on {dataset.name}: best epoch {result['best_epoch']} of {result['epochs']}, "
        f"{result['seconds_per_epoch']:.1f} s/epoch, peak {result['peak_rss_mb']:.0f} MB"
    )
    print(result_table(result))
    print(f"\nresults: {Path(args.out) / 'result.json'}")
    return 0


def _add_simulate(subparsers: argparse._SubParsersAction) -> None:
    from lumosrec.client.cohort import ENGINES
    from lumosrec.client.objectives import OBJECTIVES

    parser = subparsers.add_parser("simulate", help="federated run on Flower's Ray simulation runtime")
    parser.add_argument("--data", help="'synthetic', a downloaded dataset name, or a path")
    parser.add_argument("--out", help="run directory (metrics, checkpoint, model, result)")
    parser.add_argument("--rounds", type=int, help="num-server-rounds")
    parser.add_argument("--strategy", help="fedavg, fedprox, fedadam, ... (see pyproject.toml)")
    parser.add_argument(
        "--objective",
        choices=tuple(OBJECTIVES),
        help="local objective: sasrec (FedAvg-SASRec), cl4srec (Fed-CL4SRec), lumos (LLM views)",
    )
    parser.add_argument("--users-per-client", type=int, help="users trained jointly by one virtual client (a silo)")
    parser.add_argument(
        "--cohort-size",
        type=int,
        help="users per node, each trained on its own as a one-user client would (faster per-user FedAvg); "
        "batched training pays from about 64 drawn users per node and round (cohort-size x fraction-train)",
    )
    parser.add_argument(
        "--cohort-engine",
        choices=ENGINES,
        help="cohorts: batched (users trained together), loop (one after the other), auto (default: batched "
        "where it applies and histories are short)",
    )
    parser.add_argument("--fraction-train", type=float, help="share of clients trained per round")
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--run-config", default="", help="more overrides, TOML-typed: 'lr=0.01 strategy=\"fedprox\"'")
    parser.add_argument("--num-supernodes", type=int, help="default: users / cohort-size or users-per-client")
    parser.add_argument("--ray-address", help="attach to a running Ray cluster (host:port)")
    parser.add_argument("--client-cpus", type=int, help="CPUs per virtual client (Flower default 2)")
    parser.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds before the run is abandoned")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_resumable(_simulate))


def _resumable(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command whose runs resume, stopped cleanly by Ctrl-C and SIGTERM: its processes are stopped
    by its own cleanup, one line says how to go on (the checkpoint resumes), and the exit status is 128
    plus the signal's number (130 for Ctrl-C, 143 for SIGTERM), never a traceback."""
    from lumosrec.launch.supervise import Interrupted, interruptible

    @functools.wraps(run)
    def stoppable(args: argparse.Namespace) -> int:
        try:
            with interruptible():
                return run(args)
        except Interrupted as stop:
            print("lumos: interrupted; resume with the same command", file=sys.stderr)
            return 128 + stop.signum

    return stoppable


def _simulate(args: argparse.Namespace) -> int:
    from lumosrec.core.data import run_data
    from lumosrec.core.runconfig import parse_run_config
    from lumosrec.launch.centralized import result_table
    from lumosrec.launch.simulate import simulate, simulation_config
    from lumosrec.launch.supervise import run_summary

    named = {
        "data": args.data,
        "out-dir": args.out,
        "num-server-rounds": args.rounds,
        "strategy": args.strategy,
        "objective": args.objective,
        "users-per-client": args.users_per_client,
        "cohort-size": args.cohort_size,
        "cohort-engine": args.cohort_engine,
        "fraction-train": args.fraction_train,
        "local-epochs": args.local_epochs,
        "seed": args.seed,
    }
    overrides = {**parse_run_config(args.run_config), **{k: v for k, v in named.items() if v is not None}}
    run_config = simulation_config(overrides)
    result = simulate(run_config, args.num_supernodes, args.ray_address, args.client_cpus, args.timeout, not args.quiet)
    print(
        f"\n{result['method']} on {result['dataset']}: best round {result['best_epoch']} of {result['epochs']}, "
        f"{result['seconds_per_epoch']:.1f} s/round"
    )
    print(result_table(result))
    print(run_summary(result, Path(run_config["out-dir"]), run_data(run_config).num_users))
    return 0


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    from lumosrec.launch.experiment import ENGINES, METHODS, Budget

    parser = subparsers.add_parser("run", help="one named method (centralized, local or federated) on a dataset")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--data", default=SYNTHETIC, help="'synthetic', a downloaded dataset name, or a path")
    parser.add_argument("--out", required=True, help="run directory; a finished one is reused, not rerun")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--rounds", type=int, default=Budget.rounds, help="budget: federation rounds")
    parser.add_argument(
        "--fraction-train", type=float, default=Budget.fraction_train, help="budget: share of clients per round"
    )
    parser.add_argument("--local-epochs", type=int, default=Budget.local_epochs, help="budget: epochs per round")
    parser.add_argument("--sample-users", type=int, default=0, help="a fixed random subset of users (0: all)")
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument(
        "--run-config", default="", help="more overrides, TOML-typed: 'lumos-tau=0.5 views=\"retrieval\"'"
    )
    parser.add_argument(
        "--engine",
        default="inprocess",
        choices=ENGINES,
        help="federated methods: in this process (default) or Flower's Ray simulation",
    )
    _add_sracl_options(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_resumable(_run))


def _run(args: argparse.Namespace) -> int:
    from lumosrec.client.objectives import FEDERATED_METHODS
    from lumosrec.core.runconfig import parse_run_config
    from lumosrec.launch.centralized import result_table
    from lumosrec.launch.experiment import Budget, SRACLSettings, run_method

    check_sracl_flags(args, args.method)
    if args.rounds < 1 or args.local_epochs < 1 or not 0 < args.fraction_train <= 1:
        raise ConfigError("--rounds and --local-epochs must be at least 1, --fraction-train in (0, 1]")
    budget = Budget(args.rounds, args.fraction_train, args.local_epochs)
    overrides = {
        **parse_run_config(args.run_config),
        "sample-users": args.sample_users,
        "sample-seed": args.sample_seed,
    }
    result = run_method(
        args.method,
        args.data,
        args.out,
        args.seed,
        budget,
        overrides,
        args.engine,
        progress=not args.quiet,
        sracl=SRACLSettings(*sracl_settings(args)),
    )
    print(
        f"\n{result['method']} on {result['dataset']}: best {result['best_epoch']} of {result['epochs']} "
        f"({'rounds' if args.method in FEDERATED_METHODS else 'epochs'})"
    )
    print(result_table(result))
    print(f"\nresults: {Path(args.out) / 'result.json'}")
    return 0


def _add_deploy(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="Flower deployment: keys, node data, Fleet gateway, loopback run")
    deploy = parser.add_subparsers(dest="deploy_command", required=True)
    certs = deploy.add_parser("certs", help="operator files: CA, SuperLink certificate, ServerApp-executor secret")
    certs.add_argument(
        "--out", required=True, type=Path, help="the deployment folder (ca/, superlink/, superexec/, public/)"
    )
    certs.add_argument(
        "--host", action="append", default=[], help="SuperLink/gateway name or IP nodes use (repeatable)"
    )
    certs.set_defaults(handler=_deploy_certs)
    keys = deploy.add_parser("node-keys", help="a node's key pair and executor secret (run on the node)")
    keys.add_argument("--out", required=True, type=Path, help="the node's private folder")
    keys.add_argument("--ca", required=True, type=Path, help="the operator's public/ca.crt")
    keys.add_argument("--public-key", type=Path, help="where the public key goes (default: OUT/node.pub)")
    keys.set_defaults(handler=_deploy_node_keys)
    register = deploy.add_parser("register", help="register SuperNode public keys with the SuperLink (operator host)")
    register.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's Control API address")
    register.add_argument("--ca", required=True, type=Path, help="the operator's public/ca.crt")
    register.add_argument("public_keys", nargs="+", type=Path, metavar="NODE.pub")
    register.set_defaults(handler=_deploy_register)
    gateway = deploy.add_parser("fleet-gateway", help="forward the Fleet API, and nothing else, to the SuperLink")
    gateway.add_argument("--host", required=True, help="the node-facing address to bind")
    gateway.add_argument("--port", type=int, default=9092)
    gateway.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's address (its loopback)")
    gateway.add_argument("--ssl-certfile", required=True, type=Path, help="superlink/server.pem")
    gateway.add_argument("--ssl-keyfile", required=True, type=Path, help="superlink/server.key")
    gateway.add_argument("--ssl-ca-certfile", required=True, type=Path, help="public/ca.crt")
    gateway.set_defaults(handler=_deploy_gateway)
    split = deploy.add_parser("split", help="one data folder per node plus the catalog for the server")
    split.add_argument("--data", default=SYNTHETIC)
    split.add_argument("--nodes", type=int, required=True)
    split.add_argument("--out", required=True, type=Path)
    split.set_defaults(handler=_deploy_split)
    local = deploy.add_parser("local", help="the whole deployment on 127.0.0.1 (TLS, node auth), run the app, stop")
    local.add_argument("--data", default=SYNTHETIC)
    local.add_argument("--nodes", type=int, default=3, help="SuperNodes (3 or more: secure aggregation)")
    local.add_argument("--rounds", type=int, default=2)
    local.add_argument("--workdir", type=Path, default=Path("runs/deploy-local"))
    local.add_argument("--run-config", default="", help="more overrides, TOML-typed")
    local.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds before the run is abandoned")
    local.add_argument("--quiet", action="store_true", help="no progress bar")
    local.set_defaults(handler=_resumable(_deploy_local))


def _deploy_certs(args: argparse.Namespace) -> int:
    from lumosrec.launch.deployment import make_operator_files

    files = make_operator_files(args.out, args.host)
    print(f"operator files in {files.root}; give nodes {files.ca} only")
    return 0


def _deploy_node_keys(args: argparse.Namespace) -> int:
    from lumosrec.launch.deployment import make_node_files

    node = make_node_files(args.out, args.ca, args.public_key)
    print(f"node files in {node.folder}; send {args.public_key or node.public_key} to the operator")
    return 0


def _deploy_register(args: argparse.Namespace) -> int:
    from lumosrec.launch.deployment import register_at

    node_ids = register_at(args.superlink, args.ca, args.public_keys)
    print(f"{len(args.public_keys)} SuperNode key(s) registered ({len(node_ids)} new: {', '.join(node_ids) or '-'})")
    return 0


def _deploy_gateway(args: argparse.Namespace) -> int:
    from lumosrec.launch.deployment import run_fleet_gateway

    run_fleet_gateway(args.host, args.port, args.superlink, args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
    return 0


def _deploy_split(args: argparse.Namespace) -> int:
    from lumosrec.launch.deployment import split_nodes

    folders = split_nodes(resolve_data(args.data), args.nodes, args.out)
    print(f"{len(folders)} node folders and the catalog written to {args.out}")
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    from lumosrec.core.runconfig import parse_run_config
    from lumosrec.launch.app import APP_DIR, check_node_count, check_resume, check_run_config, default_run_config
    from lumosrec.launch.centralized import result_table
    from lumosrec.launch.deployment import LoopbackDeployment, split_nodes
    from lumosrec.launch.supervise import RunFollower, run_summary

    workdir = args.workdir.resolve()
    dataset = resolve_data(args.data)
    defaults = default_run_config()
    out = workdir / "run"
    # every node trains every round; a dead node is waited for (node-wait), then the round goes on
    # without it while min-nodes are left
    overrides = {
        "catalog": str(workdir / "data" / "catalog"),
        "out-dir": str(out),
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "min-nodes": min(int(defaults["min-nodes"]), max(args.nodes, 1)),
        **parse_run_config(args.run_config),
    }
    run_config = check_run_config(overrides, defaults)
    check_node_count(run_config, args.nodes)
    folders = split_nodes(dataset, args.nodes, workdir / "data")
    follower = RunFollower(
        out, int(run_config["num-server-rounds"]), dataset.num_users, check_resume(run_config), not args.quiet
    )
    with LoopbackDeployment(folders, workdir / "processes") as deployment:
        result = deployment.run(APP_DIR, run_config, follower, args.timeout)
    print(result_table(result))
    print(run_summary(result, out, dataset.num_users))
    return 0


def _add_views(subparsers: argparse._SubParsersAction) -> None:
    from lumosrec.augment.runtime import BACKENDS, DEFAULT_MODEL

    parser = subparsers.add_parser("views", help="on-device LLM views of users' histories (LUMOS)")
    views = parser.add_subparsers(dest="views_command", required=True)
    make = views.add_parser("generate", help="make (or reuse from the cache) the views of users")
    make.add_argument("--data", default=SYNTHETIC, help="'synthetic', a downloaded dataset name, or a path")
    make.add_argument("--out", required=True, type=Path, help="folder of the view cache and report")
    make.add_argument(
        "--views",
        default="llm",
        choices=("llm", "llm-rank", "retrieval"),
        help="'llm-rank': the LLM orders catalog candidates (one forward pass per view, transformers backend); "
        "'retrieval': no LLM, neighbour/distant items only (ablations, datasets without text)",
    )
    make.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="smollm2-135m, gemma3-270m, a .gguf file, a model folder or a Hugging Face id",
    )
    make.add_argument("--backend", default="auto", choices=BACKENDS)
    make.add_argument("--device", default="auto", help="auto, cpu or cuda (transformers backend)")
    make.add_argument(
        "--quantization",
        default="none",
        choices=("none", "4bit", "8bit"),
        help="bitsandbytes weights on CUDA (transformers backend)",
    )
    make.add_argument("--threads", type=int, default=0, help="CPU threads of the LLM (0: all available cores)")
    make.add_argument(
        "--batch",
        type=int,
        default=12,
        help="users per step; prompts decoded together (transformers batch, llama.cpp parallel slots)",
    )
    make.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="evaluate every prompt in full (llama.cpp; for throughput baselines)",
    )
    make.add_argument("--users", type=int, default=0, help="a fixed random sample of this many users (0: all)")
    make.add_argument("--user-id", action="append", default=[], help="only this user (repeatable)")
    make.add_argument("--sample-seed", type=int, default=0)
    make.add_argument("--history-len", type=int, default=10, help="recent training items in a prompt")
    make.add_argument("--items-per-view", type=int, default=5)
    make.add_argument("--max-new-tokens", type=int, default=64)
    make.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    make.add_argument("--threshold", type=float, default=0.6, help="least cosine of a generated title to its item")
    make.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sentence-transformers model for grounding")
    make.add_argument("--item-embeddings", type=Path, help="model.pt whose item embeddings give the similarity")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(handler=_views_generate)
    show = views.add_parser("inspect", help="a user's history titles next to the cached views")
    show.add_argument("--data", default=SYNTHETIC)
    show.add_argument("--out", required=True, type=Path, help="folder given to views generate")
    show.add_argument("--user-id", action="append", required=True, help="user to show (repeatable)")
    show.set_defaults(handler=_views_inspect)


def _views_generate(args: argparse.Namespace) -> int:
    from lumosrec.augment.generate import format_stats, generate_views, select_users
    from lumosrec.augment.runtime import RuntimeConfig
    from lumosrec.augment.views import ViewConfig

    dataset = resolve_data(args.data)
    view_config = ViewConfig(
        mode=args.views,
        history_len=args.history_len,
        items_per_view=args.items_per_view,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        threshold=args.threshold,
        users_per_batch=args.batch,
        seed=args.seed,
    )
    runtime = RuntimeConfig(
        model=args.model,
        backend=args.backend,
        threads=args.threads,
        batch_size=args.batch,
        device=args.device,
        quantization=args.quantization,
        prefix_cache=not args.no_prefix_cache,
    )
    users = select_users(dataset, args.users, args.user_id, args.sample_seed)
    report = generate_views(
        dataset, args.out, view_config, runtime, users, args.encoder, args.item_embeddings, progress=not args.quiet
    )
    print(format_stats(report["stats"]))
    if report["generation"]:
        generation = report["generation"]
        print(
            f"{generation['completion_tokens']} tokens generated, "
            f"{generation['completion_tokens_per_second']:.1f} tokens/s ({report['model']['backend']})"
        )
    print(f"views: {args.out / 'views.sqlite'}, report: {args.out / 'report.json'}")
    return 0


def _views_inspect(args: argparse.Namespace) -> int:
    from lumosrec.augment.generate import inspect_views

    print(inspect_views(resolve_data(args.data), args.out, args.user_id))
    return 0


def _add_data(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect, download or generate datasets")
    data = parser.add_subparsers(dest="data_command", required=True)
    stats = data.add_parser("stats", help="users, items, interactions, lengths, text coverage")
    stats.add_argument("path", help="'synthetic', a downloaded dataset name, or a path")
    stats.add_argument("--items", help="items.csv to use with a sequences file")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(handler=_stats)
    fetch = data.add_parser("download", help="fetch a public dataset and convert it")
    fetch.add_argument("name", choices=sorted(downloads.DATASETS))
    fetch.add_argument("--cache-dir", type=Path, help="default: $LUMOS_CACHE/datasets (~/.cache/lumos/datasets)")
    fetch.add_argument("--force", action="store_true", help="download and convert again")
    fetch.set_defaults(handler=_download)
    synthetic = data.add_parser("synthetic", help="write the embedded default dataset as a folder")
    synthetic.add_argument("--out", required=True, type=Path)
    synthetic.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    synthetic.set_defaults(handler=_synthetic)


def _stats(args: argparse.Namespace) -> int:
    stats = resolve_data(args.path, args.items).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        width = max(len(k) for k in stats)
        for key, value in stats.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _download(args: argparse.Namespace) -> int:
    path = downloads.download(args.name, args.cache_dir, force=args.force)
    print(f"{args.name} ready in {path}")
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    path = write_folder(generate(SyntheticConfig(seed=args.seed)), args.out)
    print(f"synthetic dataset written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumos", description="Federated sequential recommendation with on-device LLM views."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_train(subparsers)
    _add_simulate(subparsers)
    _add_run(subparsers)
    _add_deploy(subparsers)
    _add_views(subparsers)
    _add_data(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler: once is enough
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to a SuperLink
    try:
        return args.handler(args)
    except LumosError as error:
        print(f"lumos: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
