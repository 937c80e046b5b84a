"""View quality without training: every view source against the users' held-out items.

For each dataset, the views of a fixed sample of users are made from their training histories
and scored against their validation items (:mod:`lumosrec.augment.quality` has the metrics and
sources). Non-LLM sources run on the whole sample and on its first ``--llm-users`` users, the
on-device LLM sources (SmolLM2-135M, transformers backend) on those only, so that what the LLM
adds over the best non-LLM source reads directly from rows of the same users::

    taskset -c 1 python experiments/view_quality.py --data-root ../shared/data \\
        --threads 1 --cache /tmp/view-quality --out docs/results/view_quality
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lumosrec.augment.backends import load_generator
from lumosrec.augment.generate import item_space
from lumosrec.augment.grounding import ItemSpace, TextEncoder
from lumosrec.augment.quality import LLM_SOURCES, format_table, measure
from lumosrec.augment.runtime import DEFAULT_MODEL, RuntimeConfig
from lumosrec.core.data import load_data
from lumosrec.core.dataset import sample_users
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.paths import cache_dir
from lumosrec.core.results import write_json

#: users of the non-LLM sources per dataset (0: all), a fixed random sample (seed ``--sample-seed``)
SAMPLES = {"amazon-beauty": 3000, "ml-100k": 0}


def best(rows: list[dict], dataset: str, sample: str, view: str, metric: str, sources: set[str]) -> dict:
    found = [r for r in rows if r["dataset"] == dataset and r["sample"] == sample and r["view"] == view]
    return max((r for r in found if r["source"] in sources), key=lambda r: r[metric])


def report(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    non_llm = {
        r["source"] for r in rows if r["source"] not in (*LLM_SOURCES, "llm-rank-uncalibrated", "rank-candidates")
    }
    lines = [
        "# View quality without training",
        "",
        "Views made from each user's training history, scored against the validation item "
        "(leave-one-out; the test item only counts as a false negative). "
        f"LLM: {args.model} ({args.backend}, {args.threads} thread). Made by:",
        "",
        f"    {command}",
        "",
    ]
    for dataset in args.datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        lines += [f"## {dataset}", "", format_table(mine), ""]
        future = best(mine, dataset, "all", "future", "hit_at_5", non_llm)
        lines.append(
            f"- Best non-LLM source for the future view (hit@5, all {future['users']} users): "
            f"**{future['source']}** ({future['hit_at_5']:.3f}; hit@20 {future['hit_at_length']:.3f})."
        )
        llm = [r for r in mine if r["source"] in LLM_SOURCES]
        if llm:
            base = best(mine, dataset, "llm-users", "future", "hit_at_5", non_llm)
            for source in LLM_SOURCES:
                row = next((r for r in llm if r["source"] == source and r["view"] == "future"), None)
                if row is None:
                    continue
                lines.append(
                    f"- On the {row['users']} LLM users, {source}: future hit@5 {row['hit_at_5']:.3f} against "
                    f"{base['hit_at_5']:.3f} for {base['source']} (difference {row['hit_at_5'] - base['hit_at_5']:+.3f}); "
                    f"{row['users_per_min']:.1f} users/min; coverage {row['coverage']:.3f}."
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="*", default=["amazon-beauty", "ml-100k"])
    parser.add_argument("--out", type=Path, default=Path("docs/results/view_quality"))
    parser.add_argument(
        "--checkpoints",
        default="results/literature_budget/{dataset}/fedavg-sasrec/seed2024/model.pt",
        help="trained model whose item embeddings give the model sources ('' to skip them)",
    )
    parser.add_argument("--llm-users", type=int, default=60, help="first users of the sample that get LLM views")
    parser.add_argument("--llm-sources", nargs="*", default=list(LLM_SOURCES), choices=LLM_SOURCES)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/view-quality"), help="throwaway view caches")
    parser.add_argument("--sample-seed", type=int, default=0)
    args = parser.parse_args()
    command = "python experiments/view_quality.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
    )
    torch.set_num_threads(args.threads)
    encoder = TextEncoder()
    generator = (
        load_generator(RuntimeConfig(model=args.model, backend=args.backend, threads=args.threads))
        if args.llm_sources and args.llm_users
        else None
    )
    rows = []
    started = time.perf_counter()
    try:
        for name in args.datasets:
            dataset = load_data(str(args.data_root / name))
            split = leave_one_out(dataset.sequences, dataset.num_items)
            text = ItemSpace.from_text(dataset.titles, encoder, cache_dir("embeddings"))
            checkpoint = Path(args.checkpoints.format(dataset=name)) if args.checkpoints else None
            model = item_space(dataset, "retrieval", None, checkpoint) if checkpoint else None
            users = sample_users(dataset.num_users, SAMPLES.get(name, 0), args.sample_seed).tolist()
            rows += measure(
                dataset,
                split,
                users,
                args.llm_users,
                text,
                model,
                generator,
                encoder,
                args.cache,
                args.llm_sources,
                args.sample_seed,
            )
    finally:
        if generator is not None:
            generator.close()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "view_quality.json", rows)
    text_report = report(rows, args, command) + f"\nTotal {time.perf_counter() - started:.0f} s.\n"
    (args.out / "report.md").write_text(text_report)
    print(text_report)


if __name__ == "__main__":
    main()
