"""Conflict handling in coefficient space: every projected update is a linear combination of the deltas.

Given the Gram matrix ``G[i, j] = <d_i, d_j>`` of the client deltas of one block (in factor space or, exactly,
in product space via `lowrank.product_gram`), projections only ever need G: the result is a set of
coefficients over the original deltas, so the same code serves the cheap factor mode and the exact
low-rank mode, and nothing of size ``out x in`` is ever formed. All tensors carry a leading block axis B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Projection:
    """Outcome of the consensus projection for a batch of blocks (B blocks, N clients).

    merge_coef: (B, N), the merged update is ``sum_j merge_coef[j] d_j`` (= sum_i c_i (d_i - rho_i)).
    residual_coef: (B, N, N), client i's residual is ``rho_i = sum_j residual_coef[i, j] d_j``.
    alpha: (B, N), ``<d_i, g_i> / ||g_i||^2`` (0 where the consensus is empty or zero).
    cosine: (B, N), cosine between d_i and its consensus g_i (0 where undefined).
    conflict: (B, N) bool, active clients with alpha < 0 (projected).
    """

    merge_coef: torch.Tensor
    residual_coef: torch.Tensor
    alpha: torch.Tensor
    cosine: torch.Tensor
    conflict: torch.Tensor


def consensus_coefficients(weights: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
    """(B, N, N): row i holds the coefficients of the consensus client i is compared with.

    Without leave-one-out every client sees ``g = sum_j c_j d_j``. With it, client i sees the others' weighted
    mean ``sum_{j != i} c_j d_j / (1 - c_i)``: with few clients a client's own share of g hides its conflict.
    """
    num = weights.shape[-1]
    full = weights.unsqueeze(-2).expand(*weights.shape[:-1], num, num)
    if not leave_one_out:
        return full.clone()
    eye = torch.eye(num, dtype=torch.bool, device=weights.device)
    others = torch.where(eye, torch.zeros_like(full), full)
    totals = others.sum(-1, keepdim=True)
    return torch.where(totals > 1e-12, others / totals.clamp_min(1e-12), torch.zeros_like(others))


def consensus_projection(gram: torch.Tensor, weights: torch.Tensor, leave_one_out: bool = False) -> Projection:
    """Project every active client's delta off its consensus where their inner product is negative.

    For a_i = <d_i, g_i> / ||g_i||^2 < 0: d_i <- d_i - a_i g_i and rho_i = a_i g_i, so the projected delta is
    orthogonal to g_i and ``projected + rho_i == d_i``. Clients with weight 0 (inactive) are never projected.
    """
    gram = gram.to(torch.float64)
    weights = weights.to(torch.float64)
    coef = consensus_coefficients(weights, leave_one_out)
    consensus_norm2 = torch.einsum("bij,bjk,bik->bi", coef, gram, coef).clamp_min(0.0)
    inner = (coef * gram).sum(-1)
    self_norm2 = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0.0)
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1e-300)
    defined = consensus_norm2 > 1e-12 * scale
    alpha = torch.where(defined, inner / consensus_norm2.clamp_min(1e-300), torch.zeros_like(inner))
    denom = (self_norm2 * consensus_norm2).sqrt()
    cosine = torch.where(defined & (denom > 0), inner / denom.clamp_min(1e-300), torch.zeros_like(inner))
    conflict = (weights > 0) & defined & (alpha < 0)
    residual_coef = torch.where(conflict, alpha, torch.zeros_like(alpha)).unsqueeze(-1) * coef
    merge_coef = weights - torch.einsum("bi,bij->bj", weights, residual_coef)
    return Projection(merge_coef, residual_coef, alpha, cosine, conflict)


def deviation_coefficients(merge: torch.Tensor, active: torch.Tensor, eta: float) -> torch.Tensor:
    """(B, N, N): client i's whole deviation from the new global, ``rho_i = d_i - eta * sum_j merge_j d_j``.

    The retention variant ``personalized = global + lambda * (trained_i - global)``: with lambda = 1 a client
    keeps exactly what it trained, with 0 it takes the global. Zero rows for inactive clients (weight 0).
    """
    num = merge.shape[-1]
    eye = torch.eye(num, dtype=merge.dtype, device=merge.device)
    coef = eye - eta * merge.unsqueeze(-2)
    return torch.where(active.unsqueeze(-1), coef, torch.zeros_like(coef))


def pcgrad_coefficients(gram: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedGH / PCGrad: each active client's delta is projected off every other active delta it conflicts with.

    Client i's projected delta ``sum_k P[i, k] d_k`` starts as d_i and, for j in index order, loses its
    component along d_j when their inner product is negative (PCGrad projects against the *original* deltas).
    Returns P (B, N, N) and, per client, whether any projection happened (B, N) bool. The caller fixes the
    client order (the hub sorts by client id so permuting clients changes nothing).
    """
    gram = gram.to(torch.float64)
    num = gram.shape[-1]
    coef = torch.eye(num, dtype=torch.float64, device=gram.device).expand_as(gram).clone()
    touched = torch.zeros(gram.shape[:-1], dtype=torch.bool, device=gram.device)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    for i in range(num):
        for j in range(num):
            if i == j:
                continue
            inner = (coef[:, i, :] * gram[:, :, j]).sum(-1)
            hit = active[:, i] & active[:, j] & (inner < 0) & (diag[:, j] > 0)
            step = torch.where(hit, inner / diag[:, j].clamp_min(1e-300), torch.zeros_like(inner))
            coef[:, i, j] -= step
            touched[:, i] |= hit
    return coef, touched
