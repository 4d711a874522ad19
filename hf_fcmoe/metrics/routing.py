"""Routing specialisation of an MoE base: does the router send different domains to different experts?

Pure torch over expert-usage counts of shape (num_layers, num_experts) per domain. A base whose
experts do not specialise gives every domain the same near-uniform usage (normalised entropy ~1,
divergence ~0); then every client pushes every expert the same way and conflict-aware aggregation
has nothing to act on. These numbers say whether a benchmark's base can show a difference at all.
"""

from __future__ import annotations

import itertools
import math

import torch


def usage_distribution(counts: torch.Tensor) -> torch.Tensor:
    """Per-layer share of routed tokens per expert, (L, E), each row summing to 1."""
    counts = counts.double()
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def normalized_entropy(dist: torch.Tensor) -> torch.Tensor:
    """Entropy of each row divided by log(num_experts): 1 = uniform usage, 0 = one expert takes everything."""
    logs = torch.where(dist > 0, dist.log(), torch.zeros_like(dist))
    return -(dist * logs).sum(dim=-1) / math.log(dist.shape[-1])


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row in bits (0 = same usage, 1 = disjoint experts)."""
    mid = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(a > 0, a / mid.clamp_min(1e-300), torch.ones_like(a))
        return (a * ratio.log2()).sum(dim=-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def specialisation_summary(counts_by_domain: dict[str, torch.Tensor]) -> dict:
    """Per-domain normalised entropy and the mean/max pairwise JS divergence between domains (means over the
    layers that route tokens).

    Returns ``{"entropy": {domain: float}, "mean_entropy", "js_mean", "js_max", "js_per_layer": [..]}``.
    """
    # layers no domain routed any token through (dense layers of a partly upcycled model) are not MoE layers:
    # their all-zero rows would read as entropy 0 and divergence 0
    routed = torch.stack([counts.sum(-1) for counts in counts_by_domain.values()]).sum(0) > 0
    dists = {name: usage_distribution(counts[routed]) for name, counts in counts_by_domain.items()}
    entropy = {name: float(normalized_entropy(dist).mean()) for name, dist in dists.items()}
    pairs = [js_divergence(dists[a], dists[b]) for a, b in itertools.combinations(sorted(dists), 2)]
    per_layer = torch.stack(pairs).mean(dim=0) if pairs else torch.zeros(1)
    return {
        "entropy": entropy,
        "mean_entropy": sum(entropy.values()) / max(len(entropy), 1),
        "js_mean": float(per_layer.mean()),
        "js_max": float(torch.stack(pairs).mean(dim=-1).max()) if pairs else 0.0,
        "js_per_layer": [round(float(v), 4) for v in per_layer],
    }
