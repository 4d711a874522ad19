"""What a round returns besides the global state: personalized states, weights and conflict diagnostics."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from hf_fcmoe.aggregation.fedavg import normalized_weights
from hf_fcmoe.aggregation.rounds import Round
from hf_fcmoe.aggregation.types import State


def shared_zeros(state: State) -> State:
    """Zero residuals for every key, as read-only broadcast views of one scalar per key (no memory per client).

    Write to them only after ``.clone()`` / ``.contiguous()`` (saving with safetensors goes through the latter).
    """
    return {k: torch.zeros((), dtype=t.dtype).expand(t.shape) for k, t in state.items()}


class PersonalizedState(Mapping[str, torch.Tensor]):
    """A client's personalized adapter state, ``global + scale * residual``, computed key by key on access.

    Read-only mapping with the global state's keys. Keys where the client has no residual return the global
    tensor itself. Lazy because nobody needs every client's full state at once: the engine restarts clients
    from the residuals and saves adapters key by key, and materialising them up front cost the hub a full
    state of memory and a pass over it per conflicting client every round. ``dict(state)`` materialises.
    """

    def __init__(self, global_state: State, residual: State, scale: float):
        self._global, self._residual, self._scale = global_state, residual, scale

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._global[key]
        residual = self._residual.get(key)
        if residual is None:
            return tensor
        return (residual * self._scale).add_(tensor)  # bitwise equal to tensor + scale * residual

    def __iter__(self) -> Iterator[str]:
        return iter(self._global)

    def __len__(self) -> int:
        return len(self._global)


def personalized_states(rd: Round, method: str, uses_retention: bool, retention_lambda: float) -> dict[str, State]:
    """Per client: its own state (local), the global (no retention) or ``global + lambda * residual``.

    With retention, ``rd.residuals`` is completed in place: keys where a client had no conflict get a shared
    zero view, so ``personalized[c][k] == global[k] + lambda * residuals[c][k]`` holds for every key while only
    conflicting keys cost memory. The personalized states are `PersonalizedState` mappings (computed on access).
    """
    if method == "local":
        return {u.client_id: u.state for u in rd.updates}
    if not uses_retention:
        return {u.client_id: rd.new_state for u in rd.updates}
    zeros = shared_zeros(rd.new_state)
    personalized = {}
    for update in rd.updates:
        own = rd.residuals.get(update.client_id, {})
        rd.residuals[update.client_id] = {k: own.get(k, zeros[k]) for k in rd.new_state}
        personalized[update.client_id] = PersonalizedState(rd.new_state, own, retention_lambda)
    return personalized


def client_weights(rd: Round, method: str, num_layers: int, num_experts: int) -> dict[str, dict[str, float]]:
    dense = normalized_weights(rd.sizes.tolist()).tolist()
    table = rd.expert_weights.tolist() if rd.expert_weights is not None else None
    out: dict[str, dict[str, float]] = {}
    for n, update in enumerate(rd.updates):
        row = {"dense": dense[n]}
        if method != "local":
            for layer in range(num_layers):
                for expert in range(num_experts):
                    row[f"L{layer}.E{expert}"] = float(table[layer][expert][n] if table is not None else dense[n])
        out[update.client_id] = row
    return out


def conflict_diagnostics(rd: Round | None, num_layers: int, num_experts: int, with_cosine: bool = False) -> dict:
    conflicts = rd.conflicts if rd is not None else None
    if conflicts is None:
        conflicts = torch.zeros(num_layers, num_experts, dtype=torch.long)
    active = rd.active.sum(-1) if rd is not None else torch.zeros(num_layers, num_experts, dtype=torch.long)
    per_layer = [
        float(conflicts[layer].sum()) / float(active[layer].sum()) if active[layer].sum() > 0 else 0.0
        for layer in range(num_layers)
    ]
    total_active = float(active.sum())
    out = {
        "conflicts": conflicts.tolist(),
        "active_clients": active.tolist(),
        "conflict_rate_per_layer": per_layer,
        "conflict_rate": float(conflicts.sum()) / total_active if total_active else 0.0,
        "untouched_experts": int((active == 0).sum()),
    }
    if rd is not None and rd.cosine_sum is not None and with_cosine:
        out["mean_cosine_per_layer"] = [
            float(rd.cosine_sum[layer]) / float(active[layer].sum()) if active[layer].sum() > 0 else 0.0
            for layer in range(num_layers)
        ]
    return out
