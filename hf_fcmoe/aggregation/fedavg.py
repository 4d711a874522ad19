"""FedAvg math: per-tensor weighted mean of client states with a server step. Pure torch, no models or files."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalized_weights(sizes: Sequence[float]) -> torch.Tensor:
    """Weights proportional to `sizes`, summing to one (float64 for exact sums)."""
    weights = torch.as_tensor(list(sizes), dtype=torch.float64)
    return weights / weights.sum()


def weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * t_i accumulated in float32 (or float64 for float64 inputs), one pass per client."""
    acc_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    out = torch.zeros_like(tensors[0], dtype=acc_dtype)
    for weight, tensor in zip(weights.tolist(), tensors):
        out.add_(tensor if tensor.dtype == acc_dtype else tensor.to(acc_dtype), alpha=weight)
    return out


def fedavg_tensor(
    global_tensor: torch.Tensor, client_tensors: Sequence[torch.Tensor], weights: torch.Tensor, server_lr: float = 1.0
) -> torch.Tensor:
    """global + eta * sum_i w_i (client_i - global) for weights summing to one, in the global tensor's dtype.

    Computed as ``(1 - eta) global + eta sum_i w_i client_i``: no per-client delta is materialised, and with
    eta = 1 a single client's tensor comes back bit for bit.
    """
    out = weighted_sum(client_tensors, weights)
    if server_lr != 1.0:
        out.mul_(server_lr).add_(global_tensor.to(out.dtype), alpha=1.0 - server_lr)
    return out.to(global_tensor.dtype)


def mean_delta(
    global_tensor: torch.Tensor, client_tensors: Sequence[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """sum_i w_i (client_i - global) for weights summing to one (the pseudo-gradient of server optimizers)."""
    return weighted_sum(client_tensors, weights).sub_(global_tensor.to(torch.float32))
