"""Exact low-rank algebra on stacked LoRA factors without ever forming an ``out x in`` matrix.

A block's deltas are products ``P_m = B_m @ A_m`` (B: out x r, A: r x in). Stacking M of them column-/row-wise
gives ``X_B`` (out x K) and ``X_A`` (K x in), K = M*r, and any linear combination ``sum_m w_m P_m`` equals
``X_B diag(w) X_A``. Everything the hub needs follows from the two K x K Gram matrices
``G_B = X_B^T X_B`` and ``G_A = X_A X_A^T``:

- product inner products ``<P_i, P_j> = sum((B_i^T B_j) * (A_i A_j^T))`` (`product_gram`);
- the truncated SVD of ``X_B diag(w) X_A`` via two small batched ``eigh`` (`refactor`), so re-factorising a
  merged expert back to rank r costs two thin Gram products, not a dense SVD.

All functions take a leading batch axis (experts, pairs, layers) so the small LAPACK calls are batched.
"""

from __future__ import annotations

import contextlib

import torch

from hf_fcmoe.adapters.layout import split_expert_a, split_expert_b

_EIG_RTOL = 1e-12
GAUGE_COND_MAX = 10.0  # condition bound of the r x r gauge (see fix_gauge)


def stack_factors(
    b_list: list[torch.Tensor], a_list: list[torch.Tensor], num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack M PEFT factor pairs per expert: X_B (E, out, M*r) and X_A (E, M*r, in), float32, client-major."""
    xb = torch.stack([split_expert_b(b.float(), num_experts) for b in b_list], dim=2)
    xa = torch.stack([split_expert_a(a.float(), num_experts) for a in a_list], dim=1)
    return xb.flatten(2), xa.flatten(1, 2)


def gram_matrices(xb: torch.Tensor, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G_B = X_B^T X_B and G_A = X_A X_A^T (float32 products, returned as float64 for the eigen-solves)."""
    return torch.bmm(xb.transpose(1, 2), xb).double(), torch.bmm(xa, xa.transpose(1, 2)).double()


def product_gram(gram_b: torch.Tensor, gram_a: torch.Tensor, rank: int) -> torch.Tensor:
    """(batch, M, M) inner products of the M products: ``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))``."""
    batch, size, _ = gram_b.shape
    blocks = size // rank
    return (gram_b * gram_a).reshape(batch, blocks, rank, blocks, rank).sum((2, 4))


def lowrank_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product <B1 A1, B2 A2> from r x r Gram matrices (never forms B @ A)."""
    return ((b1.transpose(-1, -2) @ b2) * (a1 @ a2.transpose(-1, -2))).sum((-1, -2))


def block_expand(coef: torch.Tensor, rank: int) -> torch.Tensor:
    """(batch, M) per-product coefficients -> (batch, M*r) per stacked column/row."""
    return coef.repeat_interleave(rank, dim=-1)


def fix_gauge(
    y: torch.Tensor, ref_scale: torch.Tensor | None = None, cond_max: float = GAUGE_COND_MAX
) -> torch.Tensor:
    """Make the r x r gauge Y invertible and well conditioned: keep it when cond(Y) <= `cond_max`, else use its
    orthogonal (polar) factor scaled to `ref_scale` (default: Y's RMS singular value). With `ref_scale` (the
    reference A's RMS row norm) Y is also replaced when its RMS singular value is below ref_scale / cond_max.

    ``B A = (B Y^-1)(Y A)`` for any invertible Y; the hub picks Y so the new A stays close to the
    factor-space average (LoRA keeps training from sensible factors, and factor-space residuals stay
    meaningful). An ill-conditioned Y gives the same product with a B that is huge in some directions and an A
    that is tiny in them: training from such factors explodes (measured: TIES re-factorised with a 1e6
    condition bound grew ||B|| 100x per round until it overflowed). The scaled polar factor keeps A's norm.
    """
    u, s, vh = torch.linalg.svd(y)
    rms = s.square().mean(-1).sqrt()
    good = s[..., -1] * cond_max >= s[..., 0]
    scale = rms if ref_scale is None else ref_scale.to(s.dtype)
    if ref_scale is not None:  # the reference barely overlaps the new row space: keep its norm, not the overlap's
        good = good & (rms * cond_max >= scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    polar = (u @ vh) * scale[..., None, None]
    return torch.where(good[..., None, None], y, polar)


def refactor(
    gram_a: torch.Tensor, gram_bw: torch.Tensor, ref_a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of ``M = X_Bw X_A`` given only Gram matrices; returns (T_A, T_B, rel_error).

    Inputs (batched, float64): ``gram_a = X_A X_A^T`` (K x K), ``gram_bw = X_Bw^T X_Bw`` (K x K) of the already
    weighted B stack, ``ref_a = C X_A X_A^T`` (r x K) for the reference A factor ``A_ref = C X_A``.
    The new factors are ``A_new = T_A @ X_A`` (r x in) and ``B_new = X_Bw @ T_B`` (out x r); ``B_new A_new`` is the
    best rank-r approximation of M and ``rel_error = ||M - B_new A_new||_F / ||M||_F``.

    Math: eigh(G_A) = V S V^T gives X_A = V S^1/2 Q^T with orthonormal Q; eigh of
    H = S^1/2 V^T G_Bw V S^1/2 = W Sigma^2 W^T gives M = (X_Bw V S^1/2 W) (Q W)^T, an SVD. With the right
    singular vectors V_r = X_A^T R_A (R_A = V S^-1/2 W_r) and the gauge Y = A_ref V_r:
    A_new = Y V_r^T and B_new = U_r Sigma_r Y^-1.
    """
    evals, evecs = torch.linalg.eigh(gram_a)
    keep = evals > _EIG_RTOL * evals[..., -1:].clamp_min(1e-300)
    root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inv_root = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(evals))
    h = root.unsqueeze(-1) * (evecs.transpose(-1, -2) @ gram_bw @ evecs) * root.unsqueeze(-2)
    sig2, w = torch.linalg.eigh((h + h.transpose(-1, -2)) / 2)
    sig2 = sig2.clamp_min(0)
    w_r = w[..., -rank:].flip(-1)
    total = sig2.sum(-1)
    dropped = sig2[..., :-rank].sum(-1) if sig2.shape[-1] > rank else torch.zeros_like(total)
    rel_error = torch.where(total > 0, (dropped / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(total))
    r_a = evecs @ (inv_root.unsqueeze(-1) * w_r)
    r_b = evecs @ (root.unsqueeze(-1) * w_r)
    y = fix_gauge(ref_a @ r_a)
    t_a = y @ r_a.transpose(-1, -2)
    t_b = torch.linalg.solve(y.transpose(-1, -2), r_b.transpose(-1, -2)).transpose(-1, -2)
    return t_a, t_b, rel_error


def factorize_dense(
    matrix: torch.Tensor, rank: int, ref_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r factors (B (batch, out, r), A (batch, r, in)) of dense matrices, gauge-matched to ``ref_a``.

    For methods that must materialise the product delta (TIES/DARE trim and vote element-wise). Uses a
    full SVD for small matrices and `torch.svd_lowrank` for large ones; returns the relative truncation error.
    """
    work = matrix.double()
    if min(work.shape[-2:]) <= 1024:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        u, s, v = u[..., :rank], s[..., :rank], vh[..., :rank, :].transpose(-1, -2)
    else:
        u, s, v = torch.svd_lowrank(work, q=min(rank + 8, min(work.shape[-2:])), niter=4)
        u, s, v = u[..., :rank], s[..., :rank], v[..., :rank]
    norm2 = work.square().sum((-1, -2))
    rel_error = torch.where(norm2 > 0, ((norm2 - s.square().sum(-1)).clamp_min(0) / norm2.clamp_min(1e-300)).sqrt(), 0)
    if v.shape[-1] < rank:
        pad = rank - v.shape[-1]
        u = torch.nn.functional.pad(u, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
        v = torch.nn.functional.pad(v, (0, pad))
    ref = ref_a.double()
    y = fix_gauge(ref @ v, ref_scale=ref.square().sum((-1, -2)).div(rank).sqrt())
    a_new = y @ v.transpose(-1, -2)
    b_new = torch.linalg.solve(y.transpose(-1, -2), (u * s.unsqueeze(-2)).transpose(-1, -2)).transpose(-1, -2)
    return b_new, a_new, rel_error


@contextlib.contextmanager
def single_threaded():
    """Run small LAPACK calls (eigh/svd/solve on K x K, K ~ 72) on one thread.

    Threading them buys nothing at these sizes, and on a loaded machine the OpenMP barriers inside a threaded
    ``syevd`` cost milliseconds each (measured: 300 ms instead of 2 ms for 8 x (72 x 72) under contention).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
