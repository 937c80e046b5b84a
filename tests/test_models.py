from __future__ import annotations

import numpy as np
import pytest
import torch

from lumosrec.core.batching import PrefixSamples, pad_sequences
from lumosrec.models.augmentations import augment_batch, crop, mask, reorder
from lumosrec.models.cl4srec import CL4SRec, CL4SRecConfig
from lumosrec.models.losses import info_nce
from lumosrec.models.sasrec import SASRec, SASRecConfig


def _model(**overrides) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=30, max_len=8, hidden_size=16, inner_size=32, **overrides)).eval()


def test_output_ignores_padding_and_batch_width() -> None:
    model = _model()
    sequences = [np.array([3, 4, 5]), np.array([1, 2, 3, 4, 5, 6, 7])]
    items, lengths = pad_sequences(sequences, 8)
    together = model.score(items, lengths)
    alone = model.score(*pad_sequences(sequences[:1], 8))
    torch.testing.assert_close(together[:1], alone)
    garbage = items.clone()
    garbage[0, 3:] = 29  # overwrite padding of the short sequence
    torch.testing.assert_close(model.score(garbage, lengths), together)


def test_encoder_is_causal() -> None:
    model = _model()
    items = torch.tensor([[1, 2, 3, 4, 5]])
    changed = items.clone()
    changed[0, 4] = 9
    before, after = model.encode_positions(items), model.encode_positions(changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4], after[:, 4])


def test_training_reads_a_users_prefixes_off_one_pass() -> None:
    model = _model(dropout=0.0).double().train()
    samples = PrefixSamples([np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), np.array([4, 5, 6])], max_len=8)
    items, lengths, _, _ = samples.batch(np.arange(len(samples)))
    encoded_rows = []
    model.layers[0].register_forward_pre_hook(lambda _, inputs: encoded_rows.append(inputs[0].shape[0]))
    together = model.encode(items, lengths)
    # the first user's 8 prefixes that fit in max_len share one pass, its 2 windows (ends 9 and
    # 10, positions shifted) have their own, the second user's 2 prefixes share one
    assert encoded_rows == [1 + 2 + 1]
    alone = torch.cat(
        [model.encode_positions(items[row : row + 1, : lengths[row]])[:, -1] for row in range(len(items))]
    )
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_sasrec_learns_a_deterministic_cycle() -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=10, max_len=8, hidden_size=32, inner_size=64, dropout=0.1))
    cycle = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2)
    samples = PrefixSamples([np.roll(cycle, -k) for k in range(10)], max_len=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    items, lengths, targets, _ = samples.batch(np.arange(len(samples)))
    first = model.loss(items, lengths, targets).item()
    for _ in range(150):
        loss = model.loss(items, lengths, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.1 * first
    assert (model.score(items, lengths)[:, 1:].argmax(1) + 1 == targets).float().mean() > 0.95


def test_info_nce_by_hand() -> None:
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    hard = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # row 0: logits [1, 1, 0] target 0; row 1: logits [0, 0, 2] target 1
    expected = 0.5 * (-np.log(np.e / (2 * np.e + 1)) - np.log(1 / (2 + np.e**2)))
    assert info_nce(anchors, positives, 1.0, hard).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(anchors, positives, 0.5).item() > info_nce(anchors, anchors, 0.5).item()


def test_augmentations() -> None:
    rng = np.random.default_rng(0)
    sequence = np.arange(1, 11)
    cropped = crop(sequence, 0.6, rng)
    assert len(cropped) == 6 and np.all(np.diff(cropped) == 1)
    masked = mask(sequence, 0.3, rng)
    assert (masked == 0).sum() == 3 and set(masked[masked > 0]) <= set(sequence)
    reordered = reorder(sequence, 0.6, rng)
    assert sorted(reordered) == sorted(sequence)
    items, lengths = pad_sequences([sequence, np.array([4, 5])], 10)
    views, view_lengths = augment_batch(items, lengths, rng)
    assert views.shape[0] == 2 and (view_lengths >= 1).all() and (view_lengths <= lengths).all()


def test_cl4srec_shares_sasrec_shapes_and_trains() -> None:
    torch.manual_seed(0)
    config = CL4SRecConfig(num_items=20, max_len=8, hidden_size=16, inner_size=32)
    model = CL4SRec(config)
    sasrec_shapes = {k: v.shape for k, v in SASRec(config).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == sasrec_shapes
    samples = PrefixSamples([np.arange(1, 15), np.arange(5, 20)], max_len=8)
    items, lengths, targets, _ = samples.batch(np.arange(len(samples)))
    model.eval()  # no dropout: the contrastive term is the only difference to SASRec's loss
    plain = SASRec.loss(model, items, lengths, targets)
    off = CL4SRec(CL4SRecConfig(num_items=20, max_len=8, hidden_size=16, inner_size=32, cl_weight=0.0))
    off.load_state_dict(model.state_dict())
    assert off.eval().loss(items, lengths, targets).item() == pytest.approx(plain.item())
    loss = model.loss(items, lengths, targets, rng=np.random.default_rng(0))
    assert loss.item() > plain.item() + 1e-3  # the contrastive term is present (InfoNCE > 0)
    loss.backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0
