"""Robustness to malicious or broken clients: per-expert norm clipping, Multi-Krum selection, coordinate-wise
median / trimmed mean. Pure torch; the hub calls these on the validated updates before any method runs.

Why clipping the *vector*: FC-MoE's kappa bounds a client's importance weight, not its update, so one client
scaled by 1e6 still moves the global 5e5 times the honest step. `clip_updates` rescales each client's update of
each block (an expert of a layer across its LoRA pairs, the router of a layer, a dense pair) to at most
``factor x`` the median norm of that block's updates in the round (over the clients that routed tokens to the
expert): ``x_i <- g + s_i (x_i - g)``, ``s_i = min(1, factor * median / ||x_i - g||)``. Norms are factor-space
(||dB||^2 + ||dA||^2), in float64. Cost: one read pass over the inputs; only clipped clients get a new
(scaled) copy of the tensors they were clipped on, so a round without outliers returns the inputs bit for bit.

The opt-in aggregators (``robust_aggregator``):
- ``krum`` (any method but ``local``): Multi-Krum (Blanchard et al. 2017) drops the ``byzantine_clients`` f
  clients with the largest Krum score (sum of squared distances to their n - f - 2 nearest neighbours) before the
  method runs. Cost: an N x N Gram over the full deltas (N^2/2 dot products per tensor, one read pass); needs
  n > 2f + 2 clients, else nothing is dropped (said in diagnostics). It also drops an honest outlier.
- ``median`` / ``trimmed_mean`` (fedavg, fedprox: the expert-unaware means they replace): coordinate-wise over
  every client, ignoring data sizes; ``trimmed_mean`` drops floor(trim_fraction * N) values at each end. Cost:
  per tensor an N-fold stacked copy and a sort over clients (O(N log N) per entry, N x the memory of one tensor).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.aggregation.types import ClientUpdate, State
from hf_fcmoe.aggregation.weighting import masked_median

AGGREGATORS = ("krum", "median", "trimmed_mean")
FCMOE_NORM_CLIP = 2.0


def robust_defaults(method: str) -> dict:
    """The robustness options every method accepts (norm clipping is on by default for fcmoe only)."""
    if method == "local":
        return {}
    return {
        "norm_clip": FCMOE_NORM_CLIP if method == "fcmoe" else None,
        "robust_aggregator": None,
        "trim_fraction": 0.2,
        "byzantine_clients": 1,
    }


def validate_robust_options(method: str, opts: dict) -> None:
    """ValueError naming the bad robustness option."""
    if method == "local":
        return
    clip = opts["norm_clip"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"norm_clip must be a positive factor of the median norm or None, got {clip!r}")
    kind = opts["robust_aggregator"]
    if kind is not None and kind not in AGGREGATORS:
        raise ValueError(f"robust_aggregator must be one of {AGGREGATORS} or None, got {kind!r}")
    if kind in ("median", "trimmed_mean") and method not in ("fedavg", "fedprox"):
        raise ValueError(
            f"robust_aggregator {kind!r} replaces FedAvg's mean and works with fedavg/fedprox only; "
            f"use robust_aggregator 'krum' or norm_clip with {method!r}"
        )
    if not 0 <= opts["trim_fraction"] < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {opts['trim_fraction']!r}")
    f = opts["byzantine_clients"]
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"byzantine_clients must be a non-negative integer, got {f!r}")


# ----------------------------------------------------------------- norm clipping
def _delta(update: ClientUpdate, global_state: State, key: str) -> torch.Tensor:
    return update.state[key].double() - global_state[key].double()


def _active(updates: list[ClientUpdate], layers: int, experts: int) -> torch.Tensor:
    """(L, E, N) bool: client routed tokens to the expert (a client without counts is active everywhere)."""
    cols = [
        u.expert_counts > 0 if u.expert_counts is not None else torch.ones(layers, experts, dtype=torch.bool)
        for u in updates
    ]
    return torch.stack(cols, dim=-1)


def _expert_sq_norms(delta: torch.Tensor, key_is_a: bool, num_experts: int) -> torch.Tensor:
    """(E,) squared norms of each expert's slice of a delta (A: contiguous rows, B: strided columns)."""
    if key_is_a:
        return delta.reshape(num_experts, -1).square().sum(-1)
    return delta.reshape(delta.shape[0], -1, num_experts).square().sum((0, 1))


def _expert_scale_vector(scales: torch.Tensor, key_is_a: bool, rank: int, shape) -> torch.Tensor:
    """Per-expert scales (E,) broadcast to a factor's layout: A rows e*r..(e+1)*r, B columns k*E + e."""
    if key_is_a:
        return scales.repeat_interleave(rank)[:, None].expand(shape)
    return scales.repeat(rank)[None, :].expand(shape)


def clip_scales(norms: torch.Tensor, active: torch.Tensor, factor: float) -> torch.Tensor:
    """s = min(1, factor * median_active(norms) / norms) per row (B, N); 1 where the median is 0 or norms are 0.

    A block nobody is active on takes the median over every client.
    """
    anyone = active.any(-1, keepdim=True)
    mask = torch.where(anyone, active, torch.ones_like(active))
    threshold = factor * masked_median(norms, mask).unsqueeze(-1)
    over = (norms > threshold) & (threshold > 0)
    return torch.where(over, threshold / torch.where(over, norms, torch.ones_like(norms)), torch.ones_like(norms))


def clip_updates(
    updates: list[ClientUpdate], global_state: State, layout: ExpertLayout, factor: float
) -> tuple[list[ClientUpdate], dict[str, int]]:
    """Clip every client's update of every block to ``factor x`` the block's median norm.

    Returns the updates (clipped ones replaced by scaled copies, the others untouched) and, per clipped client,
    the number of blocks it was clipped on.
    """
    num = len(updates)
    if num == 0:
        return updates, {}
    layers, experts = layout.num_layers, layout.num_experts
    active = _active(updates, layers, experts)
    expert_sq = torch.zeros(layers, experts, num, dtype=torch.float64)
    groups: list[list[str]] = []  # router of a layer, each dense pair, each key outside the layout
    for pair in layout.pairs:
        if pair.kind == "expert":
            for key in (pair.a_key, pair.b_key):
                for i, update in enumerate(updates):
                    expert_sq[pair.layer, :, i] += _expert_sq_norms(
                        _delta(update, global_state, key), key == pair.a_key, pair.num_experts
                    )
        else:
            groups.append([pair.a_key, pair.b_key])
    in_layout = set(layout.keys)
    groups += [[key] for key in global_state if key not in in_layout]
    group_sq = torch.zeros(len(groups), num, dtype=torch.float64)
    for g, keys in enumerate(groups):
        for key in keys:
            for i, update in enumerate(updates):
                group_sq[g, i] += _delta(update, global_state, key).square().sum()
    expert_scale = clip_scales(expert_sq.sqrt(), active, factor)  # (L, E, N)
    group_scale = clip_scales(group_sq.sqrt(), torch.ones_like(group_sq, dtype=torch.bool), factor)  # (G, N)
    clipped_blocks = (expert_scale < 1).sum((0, 1)) + (group_scale < 1).sum(0)
    out, report = [], {}
    for i, update in enumerate(updates):
        if int(clipped_blocks[i]) == 0:
            out.append(update)
            continue
        report[update.client_id] = int(clipped_blocks[i])
        state = dict(update.state)
        for pair in layout.by_kind("expert"):
            scales = expert_scale[pair.layer, :, i]
            if bool((scales < 1).any()):
                for key in (pair.a_key, pair.b_key):
                    vector = _expert_scale_vector(scales, key == pair.a_key, pair.rank, state[key].shape)
                    state[key] = _scaled(update.state[key], global_state[key], vector)
        for g, keys in enumerate(groups):
            if float(group_scale[g, i]) < 1:
                for key in keys:
                    state[key] = _scaled(update.state[key], global_state[key], group_scale[g, i])
        out.append(replace(update, state=state))
    return out, report


def _scaled(tensor: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """g + s (x - g) in float64, entries with s == 1 kept bit for bit."""
    scaled = (reference.double() + scale * (tensor.double() - reference.double())).to(tensor.dtype)
    return torch.where(scale == 1, tensor, scaled) if scale.dim() else scaled


# ----------------------------------------------------------------- Multi-Krum
def krum_scores(updates: list[ClientUpdate], global_state: State, byzantine: int) -> torch.Tensor | None:
    """Krum score per client (sum of squared distances to its n - f - 2 nearest others); None if n <= 2f + 2."""
    num = len(updates)
    neighbours = num - byzantine - 2
    if byzantine == 0 or neighbours < 1:
        return None
    gram = torch.zeros(num, num, dtype=torch.float64)
    for key in global_state:
        deltas = torch.stack([_delta(u, global_state, key).flatten() for u in updates])
        gram += deltas @ deltas.T
    sq = torch.diagonal(gram)
    distances = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    distances.fill_diagonal_(float("inf"))
    return distances.sort(-1).values[:, :neighbours].sum(-1)


def krum_select(
    updates: list[ClientUpdate], global_state: State, byzantine: int
) -> tuple[list[ClientUpdate], dict[str, float], str | None]:
    """Multi-Krum: keep the n - f clients with the smallest scores; returns (kept, {dropped id: score}, note)."""
    scores = krum_scores(updates, global_state, byzantine)
    if scores is None:
        note = f"krum needs more than {2 * byzantine + 2} clients for byzantine_clients={byzantine}; none dropped"
        return updates, {}, note if byzantine else None
    order = torch.argsort(scores, stable=True)
    drop = set(order[len(updates) - byzantine :].tolist())
    kept = [u for i, u in enumerate(updates) if i not in drop]
    return kept, {updates[i].client_id: float(scores[i]) for i in sorted(drop)}, None


# ----------------------------------------------------------------- coordinate-wise aggregators
def coordinate_aggregate(tensors: list[torch.Tensor], kind: str, trim_fraction: float = 0.2) -> torch.Tensor:
    """Coordinate-wise median (mean of the two middle values for even N) or trimmed mean, in float32/64."""
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    stacked = torch.stack([t.to(acc) for t in tensors]).sort(0).values
    num = stacked.shape[0]
    if kind == "median":
        return stacked[(num - 1) // 2 : num // 2 + 1].mean(0)
    if kind == "trimmed_mean":
        cut = int(trim_fraction * num)
        return stacked[cut : num - cut].mean(0)
    raise ValueError(f"unknown coordinate aggregator {kind!r}")


def robust_mean_state(
    global_state: State, updates: list[ClientUpdate], kind: str, trim_fraction: float, server_lr: float
) -> State:
    """``g + eta * (robust aggregate of the client states - g)`` for every key (the median commutes with the shift)."""
    out = {}
    for key, reference in global_state.items():
        agg = coordinate_aggregate([u.state[key] for u in updates], kind, trim_fraction)
        if server_lr != 1.0:
            agg = agg.mul(server_lr).add(reference.to(agg.dtype), alpha=1.0 - server_lr)
        out[key] = agg.to(reference.dtype)
    return out
