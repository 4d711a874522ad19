"""The aggregation hub: validates client updates and dispatches to one aggregation method.

Knows about `ExpertLayout` and `ClientUpdate`, never about models, files or transport.
"""

from __future__ import annotations

from hf_fcmoe.aggregation.fedavg import fedavg_tensor, normalized_weights
from hf_fcmoe.aggregation.types import AggregationResult, ClientUpdate, State
from hf_fcmoe.aggregation.validation import partition_valid
from hf_fcmoe.layout import ExpertLayout

METHODS = ("fedavg", "fedprox")


class AggregationHub:
    """Merge client adapter states into a new global state.

    Args:
        layout: the adapter's `ExpertLayout` (from configs alone).
        method: ``fedavg`` or ``fedprox`` (server side of FedProx is FedAvg; mu acts in the client).
        server_lr: server step eta applied to the aggregated delta (1.0 = plain averaging).
    """

    def __init__(self, layout: ExpertLayout, method: str = "fedavg", server_lr: float = 1.0, **options):
        if method not in METHODS:
            raise ValueError(f"unknown aggregation method {method!r}; available: {', '.join(METHODS)}")
        if options:
            raise TypeError(f"unknown option(s) for method {method!r}: {sorted(options)}")
        self.layout = layout
        self.method = method
        self.server_lr = server_lr
        self.uses_retention = False

    def state_dict(self) -> dict:
        """Server-side state to checkpoint with a round (FedAvg keeps none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output when a run resumes."""

    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], round: int | None = None
    ) -> AggregationResult:
        accepted, rejected = partition_valid(updates, global_state, self.layout)
        diagnostics = {"round": round, "rejected": rejected, "num_accepted": len(accepted)}
        if not accepted:
            return AggregationResult(global_state=dict(global_state), diagnostics=diagnostics, failed=True)
        weights = normalized_weights([u.num_examples for u in accepted])
        new_state = {
            key: fedavg_tensor(tensor, [u.state[key] for u in accepted], weights, self.server_lr)
            for key, tensor in global_state.items()
        }
        per_client = {u.client_id: {"dense": float(w)} for u, w in zip(accepted, weights.tolist())}
        personalized = {u.client_id: new_state for u in accepted}
        return AggregationResult(new_state, personalized=personalized, weights=per_client, diagnostics=diagnostics)
