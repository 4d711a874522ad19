"""FedAvg math: per-tensor weighted mean of client deltas. Pure torch, no models or files."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalized_weights(sizes: Sequence[float]) -> torch.Tensor:
    """Weights proportional to `sizes`, summing to one (float64 for exact sums)."""
    weights = torch.as_tensor(list(sizes), dtype=torch.float64)
    return weights / weights.sum()


def weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * t_i accumulated in float32 (or float64 for float64 inputs)."""
    acc_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    out = torch.zeros_like(tensors[0], dtype=acc_dtype)
    for weight, tensor in zip(weights.tolist(), tensors):
        out.add_(tensor.to(acc_dtype), alpha=weight)
    return out


def fedavg_tensor(
    global_tensor: torch.Tensor, client_tensors: Sequence[torch.Tensor], weights: torch.Tensor, server_lr: float = 1.0
) -> torch.Tensor:
    """global + eta * sum_i w_i (client_i - global), in the global tensor's dtype."""
    base = global_tensor.float() if global_tensor.dtype != torch.float64 else global_tensor
    mean_delta = weighted_sum([t - global_tensor for t in client_tensors], weights)
    return (base + server_lr * mean_delta).to(global_tensor.dtype)
