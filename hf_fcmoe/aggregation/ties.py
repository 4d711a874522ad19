"""TIES and DARE-TIES merging of dense task deltas (the element-wise baselines). Pure torch.

Same semantics as `peft.utils.merge_utils.ties` / `dare_ties` (tests check agreement): prune each delta
(top-|x| for TIES, Bernoulli keep-and-rescale for DARE), elect a sign per element from the *unweighted*
pruned deltas, then average the weighted deltas that agree with it over the number that agree.
Deltas arrive stacked on dim 0 (clients); an all-zero delta (an inactive client) neither votes nor counts.
"""

from __future__ import annotations

from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries of one delta, zero the rest."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density (unbiased)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def elect_and_merge(pruned: torch.Tensor, weights: torch.Tensor, sign_method: SignMethod = "total") -> torch.Tensor:
    """Sign election over dim 0 and the disjoint (agreeing-only) mean of the weighted deltas."""
    sign = pruned.sign()
    votes = pruned.sum(0) if sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    weighted = pruned * weights.to(pruned.dtype).reshape(-1, *([1] * (pruned.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def ties_merge(
    deltas: torch.Tensor, weights: torch.Tensor, density: float, sign_method: SignMethod = "total"
) -> torch.Tensor:
    """TIES-merging of stacked deltas (N, ...) with per-delta weights (N,)."""
    pruned = torch.stack([magnitude_prune(d, density) for d in deltas])
    return elect_and_merge(pruned, weights, sign_method)


def dare_ties_merge(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    density: float,
    sign_method: SignMethod = "total",
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """DARE-TIES: random drop-and-rescale instead of magnitude trimming, then TIES' sign election.

    ``generators`` (one per delta) make the drop masks reproducible and independent of client order;
    ``None`` draws from torch's global generator, exactly like PEFT.
    """
    gens = generators if generators is not None else [None] * len(deltas)
    pruned = torch.stack([random_prune(d, density, g) for d, g in zip(deltas, gens)])
    return elect_and_merge(pruned, weights, sign_method)
