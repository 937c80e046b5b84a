"""Cohort nodes: a node hosts many users and trains each drawn one on its own, so that FedAvg over
cohorts is per-user FedAvg over the same users."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lumosrec.client.cohort import train_batched, use_batched
from lumosrec.core.batching import PrefixSamples
from lumosrec.core.errors import ConfigError
from lumosrec.core.synthetic import SyntheticConfig, generate, write_folder
from lumosrec.core.training import train_epochs
from lumosrec.launch.app import check_run_config, default_run_config
from lumosrec.launch.inprocess import run_in_process
from lumosrec.models.cl4srec import CL4SRec, CL4SRecConfig
from lumosrec.models.lumos import LUMOS, LUMOSConfig, UserViews
from lumosrec.models.sasrec import SASRec, SASRecConfig
from lumosrec.server import checkpoint
from lumosrec.server.server_app import fingerprint, round_users

SMALL = dict(num_users=60, items_per_category=10, seed=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(generate(SyntheticConfig(**SMALL)), tmp_path_factory.mktemp("cohort") / "data")


def _global_weights(data_dir: Path, out: Path, **settings) -> dict[str, torch.Tensor]:
    run = {
        "data": str(data_dir),
        "out-dir": str(out),
        "num-server-rounds": 2,
        "fraction-train": 1.0,
        "hidden-size": 16,
        "inner-size": 32,
        "dropout": 0.0,  # dropout's masks are drawn in another order when users train in a cohort
        "batch-size": 4,  # several steps per user and epoch: the order of a user's samples counts
        "eval-every": 0,
        "resume": False,
        **settings,
    }
    run_in_process(run)
    merged = check_run_config(run, default_run_config())
    return checkpoint.load(out, fingerprint(merged)).state_dict


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sasrec", "lumos"])
def test_cohorts_give_the_global_model_of_one_user_nodes(data_dir: Path, tmp_path: Path, objective: str) -> None:
    settings = {"objective": objective, "views": "retrieval", "views-dir": str(tmp_path / "views")}
    alone = _global_weights(data_dir, tmp_path / "alone", **settings)
    cohorts = _global_weights(data_dir, tmp_path / "cohorts", **settings, **{"cohort-size": 10})
    assert set(alone) == set(cohorts)
    for key, value in alone.items():
        scale = float(value.abs().max())
        assert float((cohorts[key] - value).abs().max()) <= 1e-5 * scale, key


def test_each_user_is_drawn_with_probability_fraction_train() -> None:
    run = {"seed": 7, "fraction-train": 0.1}
    rounds, users = 3000, 50
    counts = np.zeros(users)
    for server_round in range(1, rounds + 1):
        drawn = round_users(run, server_round, users)
        assert len(drawn) == len(set(drawn)) == 5
        counts[drawn] += 1
    sigma = np.sqrt(rounds * 0.1 * 0.9)
    assert np.abs(counts - rounds * 0.1).max() < 5 * sigma
    assert round_users(run, 4, users) == round_users(dict(run), 4, users)  # seeded: the same draw again


@pytest.mark.slow
def test_cohorts_none_of_whose_users_is_drawn_do_not_count(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    result = run_in_process(
        {
            "data": str(data_dir),
            "out-dir": str(out),
            "num-server-rounds": 2,
            "fraction-train": 0.02,
            "cohort-size": 10,
            "hidden-size": 16,
            "inner-size": 32,
            "eval-every": 2,
        }
    )
    assert result["failures"] == 0 and result["epochs"] == 2
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["train_users"] for row in rows] == [1, 1] and all(row["train_nodes"] == 6 for row in rows)


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"strategy": "fedmedian"}, "needs each user's update"),
        ({"strategy": "krum"}, "needs each user's update"),
        ({"dp-clipping-norm": 1.0}, "with DP clipping"),
        ({"users-per-client": 5}, "exclude each other"),
        ({"cohort-size": -1}, "must be 0"),
        (
            {
                "cohort-engine": "batched",
                "objective": "lumos",
                "lumos-lambda-future": 0.0,
                "lumos-lambda-paraphrase": 0.0,
                "lumos-paraphrase-substitution": 0.2,
            },
            "no paraphrase substitution",
        ),
        ({"cohort-engine": "batched", "client-optimizer": "adam"}, "SGD only"),
        ({"cohort-engine": "batched", "strategy": "fedprox"}, "no FedProx"),
        ({"cohort-engine": "fast"}, "choose one of auto, batched, loop"),
    ],
)
def test_cohort_mode_refuses_what_it_cannot_do(settings: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        check_run_config({"cohort-size": 10, **settings}, default_run_config())


def test_too_few_nodes_for_min_nodes_is_an_error_not_a_hang(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="wait forever"):
        run_in_process({"data": str(data_dir), "out-dir": str(tmp_path / "one"), "cohort-size": 100})


#: LUMOS with only its item-level view terms on, over retrieval views: the batched engine trains it
LUMOS_ITEM_TERMS = {
    "objective": "lumos",
    "views": "retrieval",
    "lumos-lambda-future": 0.0,
    "lumos-lambda-paraphrase": 0.0,
    "lumos-future-targets": 0.5,
    "lumos-counterfactual-negatives": 1.0,
}


#: LUMOS with its InfoNCE terms on as well: the users' heads, fresh in round 1, kept for round 2
LUMOS_INFONCE = {**LUMOS_ITEM_TERMS, "lumos-lambda-future": 0.5, "lumos-lambda-paraphrase": 0.3}


@pytest.mark.parametrize(
    "clipping, rate, objective, tolerance",
    # unclipped, 0.5 diverges in both; the InfoNCE terms (1 / tau = 5) amplify float32 rounding:
    # 3e-3 of a tensor's scale after 2 rounds (1e-13 in float64), against 0.7 with other heads
    # than the loop's
    [
        (1.0, 0.5, {}, 1e-5),
        (0.0, 0.05, {}, 1e-5),
        (1.0, 0.5, LUMOS_ITEM_TERMS, 1e-5),
        (1.0, 0.5, LUMOS_INFONCE, 1e-2),
        (1.0, 0.5, {"objective": "cl4srec"}, 3e-4),
    ],
    ids=["clipped", "unclipped", "lumos-item-terms", "lumos-infonce", "cl4srec"],
)
def test_batched_cohorts_give_the_global_model_of_the_loop(
    data_dir: Path, tmp_path: Path, clipping: float, rate: float, objective: dict, tolerance: float
) -> None:
    settings = {"cohort-size": 10, "max-grad-norm": clipping, "learning-rate": rate, **objective}
    if objective:
        settings["views-dir"] = str(tmp_path / "views")
    loop = _global_weights(data_dir, tmp_path / "loop", **settings, **{"cohort-engine": "loop"})
    batched = _global_weights(data_dir, tmp_path / "batched", **settings, **{"cohort-engine": "batched"})
    assert set(loop) == set(batched)
    for key, value in loop.items():
        scale = float(value.abs().max())
        assert float((batched[key] - value).abs().max()) <= tolerance * scale, key


#: LUMOS's terms per case: the item-level ones alone, then with the tri-view InfoNCE terms as well
LUMOS_TERMS = {
    "lumos-item-terms": dict(future_target_weight=0.5, counterfactual_negative_weight=2.0),
    "lumos-infonce": dict(
        future_target_weight=0.5, counterfactual_negative_weight=2.0, lambda_future=0.5, lambda_paraphrase=0.3
    ),
    # the "sequence-level only" ablation: no item-level term to differentiate
    "lumos-infonce-only": dict(
        future_target_weight=0.0, counterfactual_negative_weight=0.0, lambda_future=0.5, lambda_paraphrase=0.3
    ),
}


@pytest.mark.parametrize("terms", [None, *LUMOS_TERMS, "cl4srec"], ids=["sasrec", *LUMOS_TERMS, "cl4srec"])
@pytest.mark.parametrize("clipping", [1.0, 0.0])
def test_batched_training_is_each_users_own_sgd_in_float64(clipping: float, terms: str | None) -> None:
    """The low-rank item table and stacked weights are the loop's arithmetic, not an approximation:
    in float64 the mean model equals the per-user loop's to rounding; with LUMOS's item-level
    view terms (future items as targets, counterfactual items' unlikelihood) too, and with its
    InfoNCE terms, whose views enter each user's encoder and whose private heads train per user."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        sizes = dict(num_items=40, max_len=8, hidden_size=16, inner_size=32, dropout=0.0)
        generator = np.random.default_rng(3)
        # short and long histories: one batch per epoch, several batches, truncation at max-len
        sequences = [generator.integers(1, 41, size=n) for n in (2, 3, 5, 9, 12, 20)]
        user_views = None
        # the future targets on each user's last two prefixes
        recent = [sequence[-2:].tolist() for sequence in sequences]
        heads = None
        if terms == "cl4srec":  # its augmentations come from each user's stream, mask items included
            model = CL4SRec(CL4SRecConfig(**sizes, cl_weight=0.2))
        elif terms:
            model = LUMOS(LUMOSConfig(**sizes, **LUMOS_TERMS[terms]))
            # views of different lengths, one user without a future view, one without a paraphrase
            user_views = [
                {
                    "future": generator.integers(1, 41, size=(u * 2) % 5).tolist(),
                    "paraphrase": generator.integers(1, 41, size=u % 3 and 2).tolist(),
                    "counterfactual": generator.integers(1, 41, size=3).tolist(),
                }
                for u in range(6)
            ]
            if model.config.contrastive:  # every user's own head, from the same start as the loop's
                heads = [{key: value.clone() for key, value in model.private_state_dict().items()} for _ in range(6)]
        else:
            model = SASRec(SASRecConfig(**sizes))
        settings = dict(epochs=2, batch_size=4)
        batched = train_batched(
            model,
            sequences,
            [np.random.default_rng([1, u]) for u in range(6)],
            **settings,
            learning_rate=0.5,
            max_grad_norm=clipping,
            views=UserViews(user_views, recent) if user_views else None,
            heads=heads,
        )
        initial = {key: value.clone() for key, value in model.state_dict().items()}
        # what a client sends: the backbone (LUMOS's private head stays on the client)
        expected = {key: torch.zeros_like(value) for key, value in model.shared_state_dict().items()}
        counts, losses, trained_heads = [len(s) - 1 for s in sequences], [], []
        for user, sequence in enumerate(sequences):
            model.load_state_dict(initial)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            rng = np.random.default_rng([1, user])
            inputs = {"rng": rng} if terms == "cl4srec" else None
            if user_views:
                inputs = {"views": UserViews([user_views[user]], [recent[user]])}
            loss, _ = train_epochs(
                model,
                optimizer,
                PrefixSamples([sequence], 8),
                rng=rng,
                device=torch.device("cpu"),
                max_grad_norm=clipping,
                loss_inputs=inputs,
                **settings,
            )
            losses.append(loss)
            for key, value in model.shared_state_dict().items():
                expected[key] += counts[user] / sum(counts) * value
            if heads:
                trained_heads.append({key: value.clone() for key, value in model.private_state_dict().items()})
        model.load_state_dict(initial)
    finally:
        torch.set_default_dtype(torch.float32)
    assert batched.examples == sum(counts) and batched.seen == 2 * sum(counts)
    assert batched.loss == pytest.approx(np.dot(counts, losses) / sum(counts), rel=1e-10)
    assert set(batched.mean) == set(expected)
    for key, value in expected.items():
        change = float((value - initial[key]).abs().max())
        assert change > 0, key  # every tensor trained
        assert float((batched.mean[key] - value).abs().max()) <= 1e-10 * change, key
    # each user's head: trained by its own InfoNCE terms only (none without them); user 0 has no
    # future or paraphrase view, so its head stays as it was
    assert len(batched.private) == len(trained_heads)
    for user, head in enumerate(trained_heads):
        for key, value in head.items():
            change = float((value - heads[user][key]).abs().max())
            assert (change > 0) == (user > 0), (user, key)
            assert float((batched.private[user][key] - value).abs().max()) <= 1e-10 * max(change, 1e-8), (user, key)


def test_auto_trains_short_histories_batched_and_the_rest_in_the_loop() -> None:
    run = default_run_config()  # sasrec, SGD, FedAvg, batch 64, cohort-engine auto
    short, long = [np.arange(1, 9)] * 4, [np.arange(1, 200)] * 4
    assert use_batched(run, None, short) and not use_batched(run, None, long)
    assert not use_batched(run, "no batched form", short)  # the objective refuses
    assert not use_batched({**run, "client-optimizer": "adam"}, None, short)
    assert not use_batched({**run, "cohort-engine": "loop"}, None, short)
    assert use_batched({**run, "cohort-engine": "batched"}, None, long)
