"""Contrastive losses shared by CL4SRec, LUMOS and SRA-CL."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    temperature: float = 1.0,
    hard_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""InfoNCE with in-batch negatives and optional explicit hard negatives.

    For anchor :math:`a_i` the positive is :math:`p_i`; the other rows' positives
    :math:`p_{j \ne i}` and the anchor's own hard negatives :math:`n_{i,m}` form the
    denominator (van den Oord et al., 2018, "Representation Learning with Contrastive
    Predictive Coding"). Similarity is the dot product, as in the CL4SRec and SRA-CL code.

    Parameters
    ----------
    anchors, positives : Tensor, shape (B, d)
    temperature : float
    hard_negatives : Tensor, shape (B, d) or (B, M, d), optional
    """
    logits = anchors @ positives.T
    if hard_negatives is not None:
        if hard_negatives.dim() == 2:
            hard_negatives = hard_negatives[:, None, :]
        logits = torch.cat([logits, torch.einsum("bd,bmd->bm", anchors, hard_negatives)], dim=1)
    labels = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(logits / temperature, labels)


def symmetric_info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """InfoNCE in both directions, averaged: two views of a sequence are interchangeable."""
    return 0.5 * (info_nce(first, second, temperature) + info_nce(second, first, temperature))


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""NT-Xent (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations"): the ``2B`` rows of both views together; each row's positive is its
    counterpart in the other view, the other ``2B - 2`` rows are its negatives. Dot-product
    similarity, as in the SRA-CL code's ``info_nce``.

    Parameters
    ----------
    first, second : Tensor, shape (B, d)
    """
    rows = torch.cat([first, second])
    logits = rows @ rows.T / temperature
    logits.fill_diagonal_(-torch.inf)
    size = first.shape[0]
    labels = torch.cat([torch.arange(size, 2 * size), torch.arange(size)]).to(rows.device)
    return F.cross_entropy(logits, labels)
