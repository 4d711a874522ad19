"""Trainer callbacks of a client's local round.

`ExpertUsageCallback` counts, per decoder layer and expert, the tokens the router sent there during
training: the activation frequency that FC-MoE's importance weights and the hub's "who touched
this expert" sets are built from.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from hf_fcmoe.adapters.layout import layer_index
from hf_fcmoe.models.families import get_family


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1


class ExpertTokenCounter:
    """Forward hooks on every router that accumulate top-k routing counts, shape (num_layers, num_experts).

    Padding is excluded: a pre-hook on the model keeps the batch's attention mask, and a router's
    flattened (batch*seq) tokens are masked with it. Hooks never fire during the backward-time recompute
    of activation checkpointing, so each token counts once; with `training_only` (the default, for a
    local round) they also skip eval-mode forwards, and without it they measure routing at inference.
    """

    def __init__(self, model: nn.Module, training_only: bool = True):
        self.training_only = training_only
        config = model.config
        family = get_family(config)
        self.num_layers, self.num_experts = config.num_hidden_layers, family.num_experts(config)
        # accumulated where the router runs (no host sync per step); padding goes to an overflow bin
        self._buffer: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._keep_mask, with_kwargs=True)]
        self.top_k = family.top_k(config)
        for name, module in model.named_modules():
            plain = name.replace(".base_layer", "")
            if layer_index(name) is None:
                continue
            if family.decorated and plain.endswith(family.experts_path) and "is_concatenated" in vars(module):
                # every fused experts forward takes (hidden_states, top_k_index, top_k_weights): count its input,
                # whatever the router returns (deepseek's router returns logits only)
                hook = self._count_hook(layer_index(name), from_input=True)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            elif not family.decorated and name.endswith(family.router_path) and not name.endswith("base_layer"):
                self._handles.append(module.register_forward_hook(self._count_hook(layer_index(name))))

    @property
    def counts(self) -> torch.Tensor:
        """Routed tokens per (layer, expert) so far, a CPU long tensor."""
        if self._buffer is None:
            return torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        return self._buffer[:, : self.num_experts].cpu()

    def _keep_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _count_hook(self, layer: int, from_input: bool = False):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if (self.training_only and not module.training) or _in_backward():
                return None
            if from_input:  # a pre-hook with kwargs: (module, args, kwargs)
                top_k_index = inputs[1] if len(inputs) > 1 else output["top_k_index"]
            else:  # undecorated router (llama4): dense (tokens, experts) scores, the top-k of which were routed
                scores = output[0] if isinstance(output, tuple) else output
                top_k_index = scores.topk(self.top_k, dim=-1).indices
            flat = top_k_index.reshape(-1, top_k_index.shape[-1])
            if self._mask is not None and self._mask.numel() == flat.shape[0]:
                padding = ~self._mask.reshape(-1, 1).to(device=flat.device, dtype=torch.bool)
                flat = flat.masked_fill(padding, self.num_experts)
            if self._buffer is None:
                self._buffer = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.long, device=flat.device)
            flat = flat.reshape(-1)
            self._buffer[layer].scatter_add_(0, flat, torch.ones_like(flat))
            return None

        return hook

    def reset(self) -> None:
        if self._buffer is not None:
            self._buffer.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ExpertUsageCallback(TrainerCallback):
    """Counts routed tokens per (layer, expert) over one `trainer.train()`; read `.counts` afterwards."""

    def __init__(self):
        self._counter: ExpertTokenCounter | None = None
        self.counts: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._counter = ExpertTokenCounter(model)

    def on_train_end(self, args, state, control, **kwargs):
        if self._counter is None:
            return
        counts = self._counter.counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # under `accelerate launch` each process saw its own shard of the client's batches
            torch.distributed.all_reduce(counts)
        self.counts = counts
        self._counter.remove()
        self._counter = None
