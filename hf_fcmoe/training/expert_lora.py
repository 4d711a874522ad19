"""Routed-token per-expert LoRA: what LoRA on fused experts should cost.

PEFT's `ParamWrapper` (LoRA on `target_parameters`) folds ``W + scaling * B_e @ A_e`` for every expert
of every layer into a weight-sized tensor on each forward, and autograd pushes a weight-sized gradient
through it. Applied to the tokens each expert actually received, the same adapter is
``y_e += scaling * (x_e @ A_e^T) @ B_e^T``: ``tokens_e * r * (in + out)`` work and no weight-sized tensor.

How it plugs in, without copying modeling code or changing PEFT's adapter layout:

- transformers 5.x dispatches every `@use_experts_implementation` experts class through
  `ExpertsInterface`; this module registers one more implementation, ``routed_lora``, which reads the
  geometry from the experts module itself (``has_gate``, ``is_transposed``, ``has_bias``,
  ``_apply_gate``/``act_fn``, ``has_post_expert_norm``) and adds the LoRA term per routed token.
- PEFT's expert `ParamWrapper`s keep their parameters (``lora_A`` (E*r, in) in contiguous blocks,
  ``lora_B`` (out, E*r) strided), so saving, `PeftModel.from_pretrained`, `merge_and_unload`,
  `set_adapter` and `disable_adapter` stay PEFT's own. While the experts run ``routed_lora``, each
  wrapper's forward hands its live factors to the experts call instead of parametrizing the weight,
  so the delta is applied exactly once; with any other implementation it is PEFT's forward unchanged.

`configure_expert_lora_forward(model, "routed" | "peft")` switches a `PeftModel`; a model the routed path
cannot serve exactly stays on PEFT's path and says why in one log line.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from transformers.integrations.moe import ExpertsInterface

logger = logging.getLogger(__name__)

ROUTED_IMPLEMENTATION = "routed_lora"
EXPERT_LORA_FORWARDS = ("routed", "peft")
# transformers' experts implementations the routed forward reproduces for the base weights
BASE_IMPLEMENTATIONS = ("grouped_mm", "eager")
_EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FACTORS_ATTR = "_routed_lora_factors"
_BASE_IMPL_ATTR = "_routed_lora_base_implementation"
_REASON_ATTR = "_hf_fcmoe_expert_lora_fallback"

Factors = tuple[tuple[torch.Tensor, torch.Tensor, float], ...]


# --- the experts implementation


def _uses_grouped_mm(module: nn.Module, weight: torch.Tensor) -> bool:
    """torch's grouped_mm kernel where it is verified here (CPU, torch >= 2.10); a per-expert loop elsewhere."""
    base = getattr(module, _BASE_IMPL_ATTR, "grouped_mm")
    return base == "grouped_mm" and weight.device.type == "cpu" and hasattr(torch.nn.functional, "grouped_mm")


def _aligned(tensor: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned data and strides (a rank-4 bf16 row is 8 bytes)."""
    size = tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in tensor.stride() if s != 1)


def _grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, segments: list[tuple[int, int, int]], grouped: bool
) -> torch.Tensor:
    """Rows of `x` sorted by expert times that expert's (in, out) matrix: weight is (E, in, out)."""
    if grouped and _aligned(x) and _aligned(weight):
        return torch.nn.functional.grouped_mm(x, weight, offs=offsets)
    return torch.cat([x[start:end] @ weight[expert] for expert, start, end in segments])


def _expert_projection(
    module: nn.Module,
    name: str,
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    offsets: torch.Tensor,
    segments: list[tuple[int, int, int]],
    factors: Factors,
) -> torch.Tensor:
    """One fused expert projection of routed rows, plus every live LoRA adapter on it."""
    weight = getattr(module, name)  # (E, out, in), or (E, in, out) when the family stores it transposed
    grouped = _uses_grouped_mm(module, weight)
    x = x.to(weight.dtype)
    # a fresh tensor no backward needs: accumulating into it in place keeps one (rows, out) buffer per projection
    out = _grouped_matmul(x, weight if module.is_transposed else weight.transpose(1, 2), offsets, segments, grouped)
    if module.has_bias:
        out.add_(getattr(module, f"{name}_bias")[expert_ids])
    num_experts = weight.shape[0]
    for lora_a, lora_b, scaling in factors:
        # A (E*r, in): expert e = rows e*r:(e+1)*r -> (E, in, r); B (out, E*r): expert e = columns e::E -> (E, r, out)
        a = lora_a.to(weight.dtype).reshape(num_experts, -1, lora_a.shape[-1]).transpose(1, 2)
        b = lora_b.to(weight.dtype).reshape(lora_b.shape[0], -1, num_experts).permute(2, 1, 0) * scaling
        low_rank = _grouped_matmul(x, a, offsets, segments, grouped)
        out.add_(_grouped_matmul(low_rank, b.contiguous(), offsets, segments, grouped))
    return out


def routed_lora_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`ExpertsInterface` implementation: each expert's base weights and LoRA factors on its routed tokens only.

    The LoRA factors come from the PEFT wrappers around this module for the duration of their call
    (`_lora_factors`); called without them (no adapter, adapters disabled or merged) it is the plain experts.
    """
    num_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    if top_k_index.numel() == 0:
        return torch.zeros_like(hidden_states)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    rows = hidden_states[perm // top_k]
    counts = torch.bincount(expert_ids, minlength=self.num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    ends = offsets.tolist()
    segments = [(e, end - int(n), end) for e, (n, end) in enumerate(zip(counts.tolist(), ends)) if n]
    factors = getattr(self, _FACTORS_ATTR, {})
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    hidden = _expert_projection(self, up_name, rows, expert_ids, offsets, segments, factors.get(up_name, ()))
    hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
    out = _expert_projection(self, "down_proj", hidden, expert_ids, offsets, segments, factors.get("down_proj", ()))
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inverse].view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


ExpertsInterface.register(ROUTED_IMPLEMENTATION, routed_lora_experts_forward)


# --- PEFT's expert wrappers hand their factors to the experts call


@contextmanager
def _lora_factors(experts: nn.Module, parameter_name: str, factors: Factors) -> Iterator[None]:
    live = getattr(experts, _FACTORS_ATTR, None)
    if live is None:
        live = {}
        object.__setattr__(experts, _FACTORS_ATTR, live)
    previous = live.get(parameter_name)
    live[parameter_name] = factors
    try:
        yield
    finally:
        if previous is None:
            live.pop(parameter_name, None)
        else:
            live[parameter_name] = previous


def _routed_wrapper_forward(self: ParamWrapper, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`ParamWrapper.forward` for an expert parameter: PEFT's own unless the experts run ``routed_lora``."""
    experts = self.get_base_layer()
    if getattr(experts.config, "_experts_implementation", None) != ROUTED_IMPLEMENTATION:
        return ParamWrapper.forward(self, x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    if self.disable_adapters:
        if self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)
    if self.merged:
        return self.base_layer(x, *args, **kwargs)
    factors = tuple(
        (self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]))
        for name in self.active_adapters
        if name in self.lora_A
    )
    with _lora_factors(experts, self.parameter_name, factors):
        return self.base_layer(x, *args, **kwargs)


# --- switching a PeftModel


def _is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts class marked by `@use_experts_implementation` (it carries the layout flags)."""
    return all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "has_bias", "config"))


def expert_wrappers(model: nn.Module) -> list[ParamWrapper]:
    """PEFT's `ParamWrapper`s whose innermost base layer is a fused experts module."""
    return [m for m in model.modules() if isinstance(m, ParamWrapper) and _is_fused_experts(m.get_base_layer())]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the routed forward cannot reproduce PEFT's expert LoRA on `model` exactly (None: it can)."""
    wrappers = expert_wrappers(model)
    if not wrappers:
        return "the model has no PEFT LoRA on fused experts (target_parameters on a transformers experts module)"
    for wrapper in wrappers:
        experts = wrapper.get_base_layer()
        kind = type(experts).__name__
        if wrapper.parameter_name not in _EXPERT_PARAMETERS:
            return f"LoRA on {kind}.{wrapper.parameter_name} (routed path covers {', '.join(_EXPERT_PARAMETERS)})"
        if wrapper.lora_variant or any(wrapper.use_dora.values()):
            return f"a LoRA variant (e.g. DoRA) on {kind}"
        if any(wrapper.lora_bias.values()):
            return f"lora_bias on {kind}"
        if any(not isinstance(dropout, nn.Identity) for dropout in wrapper.lora_dropout.values()):
            return f"lora_dropout on {kind}"
        param = wrapper.get_param()
        if hasattr(param, "ds_shape"):
            return f"{kind} weights are partitioned (DeepSpeed ZeRO-3)"
        if type(param) not in (torch.Tensor, nn.Parameter):
            return f"{kind}.{wrapper.parameter_name} is a {type(param).__name__} (a sharded or quantized tensor)"
        if param.dtype not in _FLOAT_DTYPES:
            why = "quantized" if not param.dtype.is_floating_point else "verified for float32, bfloat16, float16"
            return f"{kind}.{wrapper.parameter_name} is stored as {param.dtype} ({why})"
        if getattr(experts, "_is_expert_parallel", False):
            return f"{kind} runs expert-parallel"
        implementation = getattr(experts, _BASE_IMPL_ATTR, None) or experts.config._experts_implementation
        if implementation not in BASE_IMPLEMENTATIONS:
            return f"experts_implementation {implementation!r} (the routed path reproduces {BASE_IMPLEMENTATIONS})"
    return None


def is_routed(model: nn.Module) -> bool:
    """True when every expert LoRA of `model` runs through the routed forward."""
    wrappers = expert_wrappers(model)
    return bool(wrappers) and all(
        "forward" in vars(w) and w.get_base_layer().config._experts_implementation == ROUTED_IMPLEMENTATION
        for w in wrappers
    )


def _pretrained_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers models inside `model` (the ones whose `set_experts_implementation` recurses)."""
    found = [m for m in model.modules() if hasattr(m, "set_experts_implementation")]
    return [m for m in found if not any(m is not other and m in set(other.modules()) for other in found)]


def enable_routed_expert_lora(model: nn.Module) -> str | None:
    """Switch the fused-expert LoRA of `model` (a PeftModel) to the routed forward; the fallback reason, or None."""
    if is_routed(model):
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    wrappers = expert_wrappers(model)
    experts_modules = {id(w.get_base_layer()): w.get_base_layer() for w in wrappers}.values()
    for experts in experts_modules:
        object.__setattr__(experts, _BASE_IMPL_ATTR, experts.config._experts_implementation)
    for pretrained in _pretrained_models(model):
        pretrained.set_experts_implementation(ROUTED_IMPLEMENTATION)
    if any(e.config._experts_implementation != ROUTED_IMPLEMENTATION for e in experts_modules):
        disable_routed_expert_lora(model)
        return "transformers did not accept experts_implementation='routed_lora' for every experts module"
    for wrapper in wrappers:
        wrapper.forward = types.MethodType(_routed_wrapper_forward, wrapper)
    return None


def disable_routed_expert_lora(model: nn.Module) -> None:
    """Back to PEFT's `ParamWrapper` forward and the experts implementation the model had before."""
    wrappers = expert_wrappers(model)
    previous = [getattr(w.get_base_layer(), _BASE_IMPL_ATTR, None) for w in wrappers]
    previous = [name for name in previous if name is not None]
    for wrapper in wrappers:
        vars(wrapper).pop("forward", None)
        experts = wrapper.get_base_layer()
        if hasattr(experts, _BASE_IMPL_ATTR):
            object.__delattr__(experts, _BASE_IMPL_ATTR)
    if previous:
        for pretrained in _pretrained_models(model):
            pretrained.set_experts_implementation(previous[0])


def configure_expert_lora_forward(model: nn.Module, mode: str = "routed") -> bool:
    """Run `model`'s fused-expert LoRA through ``routed`` tokens or ``peft``'s ParamWrapper; True if routed.

    A model the routed path cannot serve exactly stays on PEFT's path with one log line saying why
    (once per model and reason).
    """
    if mode not in EXPERT_LORA_FORWARDS:
        raise ValueError(f"expert_lora_forward={mode!r} is not one of {list(EXPERT_LORA_FORWARDS)}")
    if mode == "peft" or not expert_wrappers(model):
        disable_routed_expert_lora(model)
        return False
    reason = enable_routed_expert_lora(model)
    if reason is None:
        return True
    if getattr(model, _REASON_ATTR, None) != reason:
        object.__setattr__(model, _REASON_ATTR, reason)
        logger.warning("expert LoRA falls back to PEFT's ParamWrapper forward: %s", reason)
    return False
