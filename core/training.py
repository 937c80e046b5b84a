"""The one training loop: Adam, early stopping on validation MRR@10, best checkpoint kept.

Every centralized method trains through :func:`fit`; models differ only in their ``loss``
method (next-item cross-entropy for SASRec, plus contrastive terms for CL4SRec, LUMOS, SRA-CL).
Federated clients reuse :func:`train_epochs` for their local steps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lumosrec.core.batching import PrefixSamples
from lumosrec.core.errors import ConfigError
from lumosrec.core.evaluation import LeaveOneOut, evaluate
from lumosrec.core.progress import progress_bar

log = logging.getLogger(__name__)

EARLY_STOPPING_METRIC = "MRR@10"


@dataclass
class TrainConfig:
    """Optimisation settings (DESIGN.md / RecBole defaults)."""

    epochs: int = 200
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    max_len: int = 50
    seed: int = 2024
    device: str = "auto"

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule}, not {getattr(self, name)}"
            for name, rule, ok in (
                ("epochs", "at least 1", self.epochs >= 1),
                ("batch_size", "at least 1", self.batch_size >= 1),
                ("learning_rate", "positive", self.learning_rate > 0),
                ("weight_decay", "0 or positive", self.weight_decay >= 0),
                ("patience", "at least 1", self.patience >= 1),
                ("max_len", "at least 1", self.max_len >= 1),
            )
            if not ok
        ]
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class FitResult:
    """What :func:`fit` leaves behind: the best weights and the per-epoch history."""

    best_epoch: int
    best_state: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> list[float]:
        return [row["train_seconds"] for row in self.history]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is repeatable on the same hardware."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU with one thread per available core."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    return device


def train_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: PrefixSamples,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    device: torch.device,
    progress: bool = False,
    description: str = "train",
    regularizer: Callable[[], torch.Tensor] | None = None,
    max_grad_norm: float = 0.0,
    loss_inputs: Mapping[str, object] | None = None,
) -> tuple[float, int]:
    """Run ``epochs`` passes over ``samples``; return (mean loss, number of samples seen).

    ``regularizer`` adds a term to every batch's loss (FedProx's proximal term);
    ``max_grad_norm > 0`` clips each step's gradient norm; ``loss_inputs`` are passed to every
    ``model.loss`` call by keyword (a client's per-node inputs: its views, its random draws).
    """
    loss_inputs = dict(loss_inputs or {})
    model.train()
    total_loss, seen = 0.0, 0
    for _ in range(epochs):
        batches = list(samples.epoch(batch_size, rng))
        for indices in progress_bar(batches, desc=description, disable=not progress, leave=False, unit="batch"):
            items, lengths, targets, users = samples.batch(indices)
            loss = model.loss(items.to(device), lengths.to(device), targets.to(device), users.to(device), **loss_inputs)
            if regularizer is not None:
                loss = loss + regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
            optimizer.step()
            total_loss += loss.item() * len(indices)
            seen += len(indices)
    return total_loss / max(seen, 1), seen


#: what an interrupted :func:`fit` resumes from, next to its run's outputs
FIT_CHECKPOINT = "checkpoint.pt"


def fit(
    model: torch.nn.Module,
    split: LeaveOneOut,
    config: TrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    fingerprint: Mapping | None = None,
) -> FitResult:
    """Train ``model`` on every training prefix until validation MRR@10 stops improving.

    Parameters
    ----------
    on_epoch : callable, optional
        Called with each epoch's row (loss, validation metrics, timings) as soon as it
        exists, so that a run's metrics are on disk even if the run is interrupted.
    checkpoint : Path, optional
        Written after every epoch (model, optimizer, random streams, early-stopping state): a
        run started again with the same ``fingerprint`` continues after the last finished epoch
        and ends exactly as an uninterrupted run would; another fingerprint is refused.
    """
    device = pick_device(config.device)
    model.to(device)
    samples = PrefixSamples(split.train, config.max_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    best = FitResult(best_epoch=0, best_state=copy.deepcopy(model.state_dict()))
    best_score, waited, done = -1.0, 0, 0
    fingerprint = {**(fingerprint or {}), **{k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"}}
    if checkpoint is not None and checkpoint.is_file():
        saved = _load_fit_checkpoint(checkpoint, fingerprint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        for name, generator in _model_rngs(model).items():  # a model's own draws (CL4SRec's augmentations)
            _set_rng_state(generator, saved["model_rngs"][name])
        best = FitResult(saved["best_epoch"], saved["best_state"], saved["history"])
        best_score, waited, done = saved["best_score"], saved["waited"], len(best.history)
        for row in best.history:  # the caller's record of the epochs before the interruption
            if on_epoch is not None:
                on_epoch(row)
        log.info("resumed after epoch %d from %s", done, checkpoint)
        if progress:
            tqdm.write(f"resumed after epoch {done}")
    epochs = progress_bar(
        range(done + 1, config.epochs + 1),
        desc="epochs",
        disable=not progress,
        unit="epoch",
        initial=done,
        total=config.epochs,
    )
    for epoch in epochs:
        if waited >= config.patience:
            break  # a resumed run that had already stopped early
        started = time.perf_counter()
        loss, _ = train_epochs(model, optimizer, samples, 1, config.batch_size, rng, device, progress)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        valid = evaluate(model, split, "valid", config.max_len, device=device)
        row = {
            "epoch": epoch,
            "loss": loss,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - started,
            "valid": valid,
        }
        best.history.append(row)
        score = valid["unmasked"][EARLY_STOPPING_METRIC]
        if score > best_score:
            best_score, waited = score, 0
            best.best_epoch, best.best_state = epoch, copy.deepcopy(model.state_dict())
        else:
            waited += 1
        if checkpoint is not None:
            _save_fit_checkpoint(checkpoint, model, optimizer, rng, best, best_score, waited, fingerprint)
        if on_epoch is not None:
            on_epoch(row)
        epochs.set_postfix(loss=f"{loss:.3f}", mrr10=f"{score:.4f}", best=best.best_epoch)
        log.info("epoch %d loss %.4f valid MRR@10 %.4f (%.1fs)", epoch, loss, score, train_seconds)
        if waited >= config.patience:
            log.info("early stop: no improvement for %d epochs, best epoch %d", config.patience, best.best_epoch)
            break
    model.load_state_dict(best.best_state)
    return best


def _save_fit_checkpoint(
    path: Path, model, optimizer, rng: np.random.Generator, best: FitResult, score: float, waited: int, fingerprint
) -> None:
    payload = {
        "fingerprint": dict(fingerprint),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "model_rngs": {name: _rng_state(generator) for name, generator in _model_rngs(model).items()},
        "best_epoch": best.best_epoch,
        "best_state": best.best_state,
        "history": best.history,
        "best_score": score,
        "waited": waited,
    }
    temporary = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _model_rngs(model: torch.nn.Module) -> dict[str, np.random.Generator | torch.Generator]:
    return {k: v for k, v in vars(model).items() if isinstance(v, np.random.Generator | torch.Generator)}


def _rng_state(generator: np.random.Generator | torch.Generator) -> object:
    return generator.get_state() if isinstance(generator, torch.Generator) else generator.bit_generator.state


def _set_rng_state(generator: np.random.Generator | torch.Generator, state: object) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    else:
        generator.bit_generator.state = state


def _load_fit_checkpoint(path: Path, fingerprint: Mapping) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values: no code
        stored = saved["fingerprint"]
    except Exception as error:
        raise ConfigError(
            f"{path} cannot be read as a training checkpoint ({type(error).__name__}); "
            "delete it (or pass --overwrite) to start afresh"
        ) from error
    check_same_settings(path, stored, fingerprint, "use another --out, or --overwrite to start afresh")
    return saved


def check_same_settings(path: Path, stored: Mapping, current: Mapping, remedy: str) -> None:
    """Refuse, with one line naming the settings that differ, to resume the checkpoint at ``path``
    (written with ``stored``) under ``current`` settings."""
    if dict(stored) != dict(current):
        changed = sorted(k for k in {*stored, *current} if stored.get(k) != current.get(k))
        raise ConfigError(f"{path} belongs to a run with other settings ({', '.join(changed)}); {remedy}")
