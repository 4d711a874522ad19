"""Per-block client weights: data size, activation frequency and clipped update norm. Pure torch.

Shapes: ``B`` blocks (e.g. the experts of one layer) by ``N`` clients. A client is *active* on a block
when it routed tokens to that expert; inactive clients get weight 0 so their (untrained) delta is ignored.
Rows without any active client come back all zero, which leaves that block unchanged.
"""

from __future__ import annotations

import torch


def activation_frequency(counts: torch.Tensor) -> torch.Tensor:
    """f[..., e] = counts[..., e] / sum_e counts[..., e] (0 where a layer saw no tokens), float64."""
    counts = counts.to(torch.float64)
    totals = counts.sum(-1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1.0), torch.zeros_like(counts))


def normalize_rows(scores: torch.Tensor) -> torch.Tensor:
    """Scale each row to sum to one; rows that sum to zero stay zero (nobody to average)."""
    totals = scores.sum(-1, keepdim=True)
    return torch.where(totals > 0, scores / torch.where(totals > 0, totals, torch.ones_like(totals)), scores)


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row median over the entries where ``mask`` is True (lower median for even counts; 0 if empty)."""
    filled = torch.where(mask, values, torch.full_like(values, float("nan")))
    median = torch.nanmedian(filled, dim=-1).values
    return torch.nan_to_num(median, nan=0.0)


def size_weights(sizes: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Data-size weights n_i / sum n over the active clients of each row: the FedAvg rule per block."""
    sizes = sizes.to(torch.float64).expand(active.shape)
    return normalize_rows(torch.where(active, sizes, torch.zeros_like(sizes)))


def importance_weights(
    sizes: torch.Tensor,
    frequency: torch.Tensor,
    norms: torch.Tensor,
    active: torch.Tensor,
    kappa: float | None = 2.0,
) -> torch.Tensor:
    """FC-MoE importance c_i = s_i / sum s with s_i = n_i * f_i * min(||d_i||, kappa * median_j ||d_j||).

    The norm term favours clients that actually moved the expert; clipping at kappa x the median of the
    active clients' norms keeps one exploding (or malicious) update from owning the block. ``kappa=None``
    disables the clip. When every active norm is zero the norm term is dropped (weights n_i * f_i).
    """
    base = torch.where(active, sizes.to(torch.float64) * frequency.to(torch.float64), torch.zeros_like(frequency))
    norms = norms.to(torch.float64)
    if kappa is not None:
        norms = torch.minimum(norms, kappa * masked_median(norms, active).unsqueeze(-1))
    scores = base * norms
    degenerate = (scores.sum(-1, keepdim=True) <= 0) & (base.sum(-1, keepdim=True) > 0)
    return normalize_rows(torch.where(degenerate, base, scores))
