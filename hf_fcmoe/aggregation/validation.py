"""Transport-level checks of client updates: reject a bad update with a reason, keep the rest."""

from __future__ import annotations

import torch

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.aggregation.types import ClientUpdate, State


class UpdateRejected(ValueError):
    """An update that cannot be aggregated; the message names the client and the problem."""

    def __init__(self, client_id: str, problem: str):
        super().__init__(f"client {client_id!r}: {problem}")
        self.client_id = client_id
        self.problem = problem


def check_update(update: ClientUpdate, global_state: State, layout: ExpertLayout) -> None:
    """Raise `UpdateRejected` if `update` does not fit `global_state` and `layout`."""
    cid = update.client_id
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) or update.num_examples <= 0:
        raise UpdateRejected(cid, f"num_examples must be a positive integer, got {update.num_examples!r}")
    missing = sorted(set(global_state) - set(update.state))
    extra = sorted(set(update.state) - set(global_state))
    if missing:
        raise UpdateRejected(cid, f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        raise UpdateRejected(cid, f"unexpected keys {extra[:3]}{'...' if len(extra) > 3 else ''}")
    expected = layout.expected_shapes()
    for key, reference in global_state.items():
        tensor = update.state[key]
        if tuple(tensor.shape) != tuple(reference.shape):
            hint = ""
            if key in expected and tuple(reference.shape) == expected[key] and tensor.dim() == 2:
                pair = layout.pair_of(key)
                size = tensor.shape[0] if key == pair.a_key else tensor.shape[1]
                hint = f" (rank {size / pair.num_experts:g} differs from layout rank {pair.rank})"
            raise UpdateRejected(
                cid, f"{key} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}{hint}"
            )
        if tensor.dtype != reference.dtype:
            raise UpdateRejected(cid, f"{key} has dtype {tensor.dtype}, expected {reference.dtype}")
        if not _all_finite(tensor):
            raise UpdateRejected(cid, f"{key} contains NaN or Inf")
    if update.expert_counts is not None:
        shape = (layout.num_layers, layout.num_experts)
        if tuple(update.expert_counts.shape) != shape:
            raise UpdateRejected(cid, f"expert_counts has shape {tuple(update.expert_counts.shape)}, expected {shape}")
        if update.expert_counts.dtype.is_floating_point or update.expert_counts.dtype == torch.bool:
            raise UpdateRejected(cid, f"expert_counts must be integer token counts, got {update.expert_counts.dtype}")
        if (update.expert_counts < 0).any():
            raise UpdateRejected(cid, "expert_counts contains negative counts")


def partition_valid(
    updates: list[ClientUpdate], global_state: State, layout: ExpertLayout
) -> tuple[list[ClientUpdate], dict[str, str]]:
    """Split updates into the accepted ones and ``{client_id: reason}`` for the rejected ones."""
    accepted: list[ClientUpdate] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    for update in updates:
        if update.client_id in seen:
            rejected[f"{update.client_id}#duplicate"] = f"client {update.client_id!r}: duplicated client id"
            continue
        seen.add(update.client_id)
        try:
            check_update(update, global_state, layout)
        except UpdateRejected as error:
            rejected[update.client_id] = str(error)
            continue
        accepted.append(update)
    return accepted, rejected


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN/Inf. A finite sum proves it in one cheap pass; only an overflowing sum
    (or a real NaN/Inf) pays for the element-wise check."""
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())
