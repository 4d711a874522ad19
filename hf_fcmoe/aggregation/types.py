"""The records that cross the client/server seam: what a client reports and what the hub returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """One client's report after its local round.

    state: the client's adapter state after local training (PEFT adapter state-dict keys, as in
        ``adapter_model.safetensors``). A client that started from ``global + lambda * residual``
        reports ``trained - lambda * residual`` so the hub's delta is local progress only.
    expert_counts: routed token counts, (num_layers, num_experts), int64; None when unknown.
    fingerprint: `update_fingerprint` of the base config, LoRA config and round the client trained from; the hub
        rejects an update whose fingerprint differs from the one the server announced (None: not sent).
    """

    client_id: str
    state: State
    num_examples: int
    expert_counts: torch.Tensor | None = None
    train_loss: float | None = None
    metrics: dict = field(default_factory=dict)
    fingerprint: str | None = None


@dataclass
class AggregationResult:
    """What one aggregation round produced.

    global_state: same keys, shapes and dtypes as the input global state.
    residuals: per client, a state-shaped dict; ``personalized[c] == global_state + retention_lambda * residuals[c]``
        element-wise (empty for methods without retention).
    personalized: per client, its personalized adapter state (a read-only mapping that computes
        ``global + lambda * residual`` key by key on access; ``dict(...)`` materialises it).
    weights: per client, per expert block ``"L{layer}.E{expert}"`` (and ``"dense"``), the weight it got.
    diagnostics: conflict counts/rates, norms, rejected updates and why.
    failed: True when every update was rejected and the global state was returned unchanged.
    """

    global_state: State
    personalized: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    residuals: dict[str, State] = field(default_factory=dict)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    failed: bool = False
