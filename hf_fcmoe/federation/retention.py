"""Local knowledge retention, engine-independent: a client's start state and personalized adapter from its residual.

The in-process engine keeps every client's residual in memory; a Flower node keeps its own on its disk.
Both form the same states with these functions.
"""

from __future__ import annotations

from hf_fcmoe.aggregation import AggregationHub, AggregationResult
from hf_fcmoe.aggregation.types import State


def add_scaled(state: State, residual: State | None, scale: float) -> State:
    """state + scale * residual, in the state's dtypes (the state itself when there is nothing to add)."""
    if residual is None or scale == 0:
        return state
    return {key: (tensor.float() + scale * residual[key].float()).to(tensor.dtype) for key, tensor in state.items()}


def hub_retention(hub: AggregationHub) -> float:
    """lambda of the hub's retention (0 when the method keeps no residual)."""
    return float(getattr(hub, "retention_lambda", 0.0)) if getattr(hub, "uses_retention", False) else 0.0


def scaled(residual: State | None, scale: float) -> State | None:
    """scale * residual in fp32 (what a client's start state adds to the global), or None."""
    if residual is None or scale == 0:
        return None
    return {key: scale * tensor.float() for key, tensor in residual.items()}


def new_residuals(result: AggregationResult, keeps_own_state: bool) -> dict[str, State]:
    """The residuals a round leaves each client with; `local` stores a client's own state as own - global."""
    if not keeps_own_state:
        return result.residuals
    return {
        cid: {key: state[key].float() - result.global_state[key].float() for key in state}
        for cid, state in result.personalized.items()
    }
