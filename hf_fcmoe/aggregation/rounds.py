"""The per-round record the hub's paths share (accepted updates, weights, outputs under construction)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_fcmoe.aggregation.types import ClientUpdate, State


@dataclass
class Round:
    """Everything one aggregation round shares between layers (N accepted clients, sorted by id)."""

    updates: list[ClientUpdate]
    global_state: State
    sizes: torch.Tensor  # (N,) float64
    counts: torch.Tensor  # (L, E, N) float64 routed tokens (ones where a client reported none)
    frequency: torch.Tensor  # (L, E, N)
    active: torch.Tensor  # (L, E, N) bool
    new_state: State = field(default_factory=dict)
    residuals: dict[str, State] = field(default_factory=dict)  # only keys where the client had a conflict
    expert_weights: torch.Tensor | None = None  # (L, E, N)
    conflicts: torch.Tensor | None = None  # (L, E) int
    cosine_sum: torch.Tensor | None = None  # (L,) over active (client, expert) pairs
    truncation: list[float] = field(default_factory=list)

    def sources(self, key: str) -> list[torch.Tensor]:
        """The global tensor of ``key`` followed by every client's (the order the streaming kernels expect)."""
        return [self.global_state[key]] + [u.state[key] for u in self.updates]
