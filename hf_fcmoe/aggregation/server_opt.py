"""Adaptive server optimizers (FedAdam / FedYogi, Reddi et al. 2021) on the mean client delta. Pure torch.

The mean delta is a pseudo-gradient step: ``m <- b1 m + (1 - b1) D``; Adam: ``v <- b2 v + (1 - b2) D^2``;
Yogi: ``v <- v - (1 - b2) D^2 sign(v - D^2)``; ``x <- x + lr * m / (sqrt(v) + tau)``. As in the paper there is
no bias correction and v starts at tau^2. The moments live here so a hub can checkpoint and resume exactly.
"""

from __future__ import annotations

from typing import Literal

import torch


class ServerOptimizer:
    """Per-tensor FedAdam/FedYogi state and step."""

    def __init__(
        self, kind: Literal["adam", "yogi"], lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ):
        if kind not in ("adam", "yogi"):
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0

    def step(self, key: str, param: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        """Return the new value of ``param`` (its dtype) after one server step with pseudo-gradient ``mean_delta``."""
        delta = mean_delta.float()
        m = self.m.get(key, torch.zeros_like(delta))
        v = self.v.get(key, torch.full_like(delta, self.tau**2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        sq = delta.square()
        if self.kind == "adam":
            v = self.beta2 * v + (1 - self.beta2) * sq
        else:
            v = v - (1 - self.beta2) * sq * torch.sign(v - sq)
        self.m[key], self.v[key] = m, v
        return (param.float() + self.lr * m / (v.sqrt() + self.tau)).to(param.dtype)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        self.m = {k: t.clone() for k, t in state.get("m", {}).items()}
        self.v = {k: t.clone() for k, t in state.get("v", {}).items()}
