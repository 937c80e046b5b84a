"""Results tables across seeds: where runs live, their summaries, gains with a noise check.

Shared by the experiment runners (``experiments/table_main.py``, ``experiments/table_sracl.py``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from lumosrec.core.dataset import Dataset
from lumosrec.core.errors import LumosError
from lumosrec.core.evaluation import evaluate, leave_one_out
from lumosrec.models.factory import build_model

#: the test metrics the tables show, under the default protocol
MAIN_METRICS = ("HR@10", "HR@20", "NDCG@10", "NDCG@20")
PROTOCOL = "unmasked"
#: datasets the tables run on a fixed user subset (LLM time on CPU), the same for every method
SAMPLED_FOR_LLM = ("amazon-beauty",)


def slug(label: str) -> str:
    """A row label as a folder and command-line name: ``sracl w/o user CL`` -> ``sracl-wo-user-CL``."""
    return label.replace(" ", "-").replace("/", "").replace("--", "-")


def run_folder(out: Path, dataset: str, label: str, seed: int) -> Path:
    """``<out>/<dataset>/<label>/seed<k>``: one run of a table."""
    return out / dataset / slug(label) / f"seed{seed}"


def read_earlier_report(path: Path, kind: type, what: str) -> dict | list:
    """An earlier report's JSON (``--earlier``), which must be a ``kind``: a table outlives the run
    folders of the machine that ran it (they are not committed). ``what`` names the file in errors."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LumosError(f"cannot read the earlier report {path}: {error}") from None
    if not isinstance(earlier, kind):
        raise LumosError(f"{path} is not a {what}")
    return earlier


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation over seeds of each test metric."""
    return summary_of([{m: run["result"]["test"][PROTOCOL][m] for m in MAIN_METRICS} for run in runs])


def summary_of(seeds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """:func:`summarize` of each seed's test metrics (``{metric: value}`` per seed)."""
    summary = {}
    for metric in MAIN_METRICS:
        values = [seed[metric] for seed in seeds]
        summary[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }
    return summary


def pooled(first: dict[str, dict[str, float]], second: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Two :func:`summarize` results of disjoint seeds as one: the mean and sample standard
    deviation of all their runs, from each part's mean, deviation and count alone (an earlier
    session's summary plus the seeds run since)."""
    summary = {}
    for metric in first:
        a, b = first[metric], second[metric]
        n = a["n"] + b["n"]
        mean = (a["n"] * a["mean"] + b["n"] * b["mean"]) / n
        squares = sum((part["n"] - 1) * part["std"] ** 2 + part["n"] * (part["mean"] - mean) ** 2 for part in (a, b))
        summary[metric] = {"mean": mean, "std": math.sqrt(squares / (n - 1)), "n": n}
    return summary


def gain(method: dict, baseline: dict) -> dict[str, float | bool]:
    """Relative gain of the means, whether the difference exceeds twice its standard error, and
    whether that could be told (a side with one seed has no measured noise)."""
    mean, base = method["mean"], baseline["mean"]
    error = math.sqrt(method["std"] ** 2 / method["n"] + baseline["std"] ** 2 / baseline["n"])
    return {
        "relative": mean / base - 1 if base else math.nan,
        "beyond_noise": abs(mean - base) > 2 * error > 0,
        "noise_measured": min(method["n"], baseline["n"]) > 1,
    }


def paired_gain(method: dict[int, float], baseline: dict[int, float]) -> dict[str, float | bool | int] | None:
    """The same check over the seeds both sides ran (``{seed: value}``), seed by seed: a seed fixes
    the initial model and the clients drawn each round for every method, so the per-seed
    differences carry less of the seed's own noise than the two means do. ``None`` below 2 shared
    seeds."""
    shared = sorted(set(method) & set(baseline))
    if len(shared) < 2:
        return None
    differences = [method[seed] - baseline[seed] for seed in shared]
    error = statistics.stdev(differences) / math.sqrt(len(shared))
    return {
        "seeds": len(shared),
        "mean_difference": statistics.fmean(differences),
        "beyond_noise": abs(statistics.fmean(differences)) > 2 * error > 0,
    }


def gain_cell(found: dict) -> str:
    """One :func:`gain` as a table cell: the relative gain, what is known of its noise, and the
    :func:`paired_gain` check where there is one (under ``paired``)."""
    if not found.get("noise_measured", True):
        return f"{found['relative']:+.1%} (one seed: noise unknown)"
    notes = [] if found["beyond_noise"] else ["within noise"]
    if found.get("paired"):
        paired = found["paired"]
        notes.append(f"seed by seed ({paired['seeds']}): {'beyond' if paired['beyond_noise'] else 'within'} noise")
    return f"{found['relative']:+.1%}" + (f" ({'; '.join(notes)})" if notes else "")


def cell(summary: dict) -> str:
    """``mean ± std`` of one summary."""
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}"


def saved_model_metrics(model_file: Path, dataset: Dataset, users: np.ndarray) -> dict[str, dict[str, float]]:
    """Test metrics, per protocol, of a run's saved SASRec-family model (``model.pt``) on
    ``users`` of ``dataset`` alone (dataset indices): a table's rows compared on a user subset."""
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    sizes = {key: value for key, value in saved["config"].items() if key != "num_items"}
    model = build_model("sasrec", int(saved["config"]["num_items"]), **sizes)
    # heads of other objectives (CL4SRec's, LUMOS's private one) are not part of scoring
    missing = model.load_state_dict(saved["state_dict"], strict=False).missing_keys
    if missing:
        raise ValueError(f"{model_file} is not a SASRec-family model: it lacks {', '.join(missing)}")
    model.eval()
    split = leave_one_out([dataset.sequences[user] for user in users], dataset.num_items)
    return evaluate(model, split, "test", model.config.max_len)
