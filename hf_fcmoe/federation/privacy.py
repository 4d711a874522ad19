"""Client-side differential privacy of the adapter update, and its accounting (Opacus' RDP accountant).

A client clips its whole update d = reported - global to L2 norm ``dp_clip_norm`` (C) and adds Gaussian noise
N(0, (sigma C)^2) to every coordinate before sending it (``sigma = dp_noise_multiplier``). That is the Gaussian
mechanism on the client's *entire* contribution, so the guarantee is client-level (add or remove the client's
whole data set), against everyone who sees the update, the server included. The server knows who takes part,
so no amplification by sampling is claimed: each round a client takes part is one Gaussian mechanism with
sampling rate 1, composed over its rounds with Renyi DP (`opacus.accountants.analysis.rdp`).

Not protected: ``num_examples``, ``expert_counts`` (the routing histogram of the client's tokens) and the train
loss are sent in the clear; the personalized adapter never leaves the client in a real deployment, but the
simulation stores it. In the simulation the noise is drawn from a generator seeded by (seed, round, client) so a
resumed run is exact; a real client must draw it from a secure source.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from hf_fcmoe.aggregation.types import ClientUpdate, State

RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]


def privatize_update(
    update: ClientUpdate, global_state: State, clip_norm: float, noise_multiplier: float, seed: int
) -> ClientUpdate:
    """The update with its delta clipped to ``clip_norm`` and Gaussian noise (std ``noise_multiplier * clip_norm``)."""
    deltas = {key: update.state[key].double() - global_state[key].double() for key in global_state}
    norm = torch.sqrt(sum(d.square().sum() for d in deltas.values()))
    scale = min(1.0, clip_norm / float(norm)) if float(norm) > 0 else 1.0
    generator = torch.Generator().manual_seed(int(seed))
    std = noise_multiplier * clip_norm
    state = {}
    for key, delta in deltas.items():
        noise = torch.randn(delta.shape, generator=generator, dtype=torch.float64) * std
        state[key] = (global_state[key].double() + scale * delta + noise).to(global_state[key].dtype)
    return replace(update, state=state, metrics={**update.metrics, "dp_update_norm": float(norm)})


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of ``rounds`` Gaussian mechanisms with noise multiplier ``noise_multiplier`` (RDP)."""
    if rounds <= 0:
        return 0.0
    try:
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    except ImportError as error:  # pragma: no cover - the `privacy` extra is missing
        raise ImportError("dp_noise_multiplier needs opacus: pip install 'hf-fcmoe[privacy]'") from error
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=rounds, orders=RDP_ORDERS)
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": epsilon is then an upper bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)
