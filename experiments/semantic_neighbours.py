"""How much behaviour SRA-CL's semantic retrieval finds, against random retrieval.

SRA-CL's premise (Cui et al., NeurIPS 2025) is that users whose LLM-written summaries are close
behave alike, and so do items whose descriptions are close. This checks it on the training
part of each dataset, for the LLM texts and for the raw-text ablation (titles embedded as they
are), without training anything:

- **users**: mean Jaccard similarity of the training item sets of a user and each of its ``k``
  retrieved neighbours;
- **items**: share of an item's ``k`` retrieved neighbours that some user interacted with in
  training along with it (co-occurrence), and mean Jaccard similarity of their category sets.

Each is set against the same number of neighbours drawn at random, the ``random retrieval``
ablation. It reads the text cache that ``table_sracl.py`` filled (a dataset without cached
texts has them generated first)::

    python experiments/semantic_neighbours.py --data-root ../shared/data --out results/semantic_neighbours
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lumosrec.augment.semantic import SemanticConfig, build_semantic_side
from lumosrec.core.data import load_data
from lumosrec.core.evaluation import leave_one_out
from lumosrec.core.results import write_json
from lumosrec.launch.tables import SAMPLED_FOR_LLM


def jaccard(left: set, right: set) -> float:
    return len(left & right) / len(left | right) if left | right else 0.0


def user_overlap(item_sets: list[set[int]], neighbours: np.ndarray) -> float:
    return float(
        np.mean([jaccard(item_sets[user], item_sets[other]) for user, row in enumerate(neighbours) for other in row])
    )


def item_agreement(
    item_users: dict[int, set[int]], categories: list[tuple[str, ...]], neighbours: np.ndarray
) -> dict[str, float]:
    pairs = [(item, int(other)) for item in item_users for other in neighbours[item] if other != item]
    return {
        "co_occurring": float(np.mean([bool(item_users[i] & item_users.get(j, set())) for i, j in pairs])),
        "category_jaccard": float(np.mean([jaccard(set(categories[i]), set(categories[j])) for i, j in pairs])),
    }


def measure(dataset_dir: Path, sample: int, sample_seed: int, source: str) -> dict:
    dataset = load_data(str(dataset_dir), sample, sample_seed)
    split = leave_one_out(dataset.sequences, dataset.num_items)
    item_sets = [set(sequence.tolist()) for sequence in split.train]
    item_users: dict[int, set[int]] = {}
    for user, items in enumerate(item_sets):
        for item in items:
            item_users.setdefault(item, set()).add(user)
    found = {}
    for retrieval in ("semantic", "random"):
        side = build_semantic_side(dataset, split, SemanticConfig(source=source, retrieval=retrieval), progress=False)
        found[retrieval] = {
            "user_jaccard": user_overlap(item_sets, side.user_neighbours),
            **item_agreement(item_users, dataset.categories, side.item_neighbours),
        }
    found["semantic_over_random"] = {
        metric: found["semantic"][metric] / found["random"][metric] if found["random"][metric] else float("nan")
        for metric in found["semantic"]
    }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/semantic_neighbours"))
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "amazon-beauty"])
    parser.add_argument("--sources", nargs="*", default=["llm", "raw-text"], choices=["llm", "raw-text"])
    parser.add_argument("--beauty-users", type=int, default=1000, help="the LUMOS table's Beauty subset")
    parser.add_argument("--sample-seed", type=int, default=0)
    args = parser.parse_args()
    results = {
        dataset: {
            source: measure(
                args.data_root / dataset,
                args.beauty_users if dataset in SAMPLED_FOR_LLM else 0,
                args.sample_seed,
                source,
            )
            for source in args.sources
        }
        for dataset in args.datasets
    }
    lines = [
        "| dataset | texts | retrieval | user item-set Jaccard | items co-occurring | item category Jaccard |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, sources in results.items():
        for source, found in sources.items():
            for retrieval in ("semantic", "random", "semantic_over_random"):
                cells = found[retrieval]
                lines.append(
                    f"| {dataset} | {source} | {retrieval.replace('_', ' ')} | "
                    + " | ".join(f"{cells[m]:.4f}" for m in ("user_jaccard", "co_occurring", "category_jaccard"))
                    + " |"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(
        args.out / "semantic_neighbours.json",
        {"results": results, "beauty_users": args.beauty_users, "sample_seed": args.sample_seed},
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
