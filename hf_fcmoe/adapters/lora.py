"""Per-expert LoRA through PEFT, and the `ExpertLayout` read off PEFT's wrappers.

The layout is read from the wrappers themselves (each `ParamWrapper` knows its `parameter_name`)
rather than guessed from key names: two parameters on one module are nested wrappers whose key
order depends on PEFT's sorting. `expert_layout_from_configs` builds the PEFT model on the meta
device, so the aggregation server gets the exact layout of a 47B Mixtral without any weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from transformers import AutoModelForCausalLM, PretrainedConfig

from hf_fcmoe.adapters.layout import ExpertLayout, LoraPair, layer_index
from hf_fcmoe.adapters.peft_quirks import muted_checkpointing_probe
from hf_fcmoe.models.families import MoEFamily, get_family

ADAPTER_NAME = "default"
TARGET_CHOICES = ("experts", "router", "attention", "shared_experts")
_V4_EXPERT_NAMES = {"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}


def build_lora_config(
    family: MoEFamily,
    r: int = 8,
    lora_alpha: int = 16,
    targets: Sequence[str] = ("experts", "router"),
    base_model_name_or_path: str | None = None,
) -> LoraConfig:
    """A `LoraConfig` putting one LoRA per expert on the fused expert tensors, plus the selected extras.

    targets: any of ``experts`` (fused gate_up/down, per expert), ``router`` (router weight),
    ``attention`` (q/k/v/o projections), ``shared_experts`` (dense shared expert, where the family has one).
    """
    unknown = sorted(set(targets) - set(TARGET_CHOICES))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {list(TARGET_CHOICES)}")
    if "experts" not in targets:
        raise ValueError("LoRA targets must include 'experts' (the per-expert adapters are what is federated)")
    target_parameters = [f"{family.experts_path}.{name}" for name in family.expert_parameters]
    if "router" in targets:
        target_parameters.append(f"{family.router_path}.weight")
    dense: list[str] = []
    for target, names, where in (
        ("attention", family.attention_modules, family.attention_module),
        ("shared_experts", family.shared_expert_modules, family.moe_module),
    ):
        if target not in targets:
            continue
        if not names:
            raise ValueError(
                f"LoRA target {target!r} does not exist in model_type {family.model_type!r} (it has no {target} "
                "Linear layers); drop it from lora_targets"
            )
        dense += [f"{where}.{name}" for name in names]
    # PEFT rewrites target_modules named like transformers-v4 expert projections (gate_proj, up_proj, down_proj,
    # w1-w3, gate) into fused expert targets, silently dropping e.g. a shared expert's gate_proj; those Linears
    # are targeted through their weight parameter instead (a 2D ParamWrapper, the same delta).
    target_modules = [path for path in dense if path.rsplit(".", 1)[-1] not in _V4_EXPERT_NAMES]
    target_parameters += [f"{path}.weight" for path in dense if path.rsplit(".", 1)[-1] in _V4_EXPERT_NAMES]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,  # PEFT's ParamWrapper cannot apply dropout to fused expert weights
        target_modules=target_modules,
        target_parameters=target_parameters,
        base_model_name_or_path=base_model_name_or_path,
    )


def _get_peft_model(model, lora_config: LoraConfig) -> PeftModel:
    """`get_peft_model` on a copy of the config (PEFT mutates it), without PEFT's deprecation probe warning."""
    with muted_checkpointing_probe():
        return get_peft_model(model, copy.deepcopy(lora_config))


def apply_expert_lora(model, lora_config: LoraConfig) -> PeftModel:
    """Wrap `model` with the per-expert LoRA adapter.

    PEFT replaces the config's `base_model_name_or_path` with the model's own `name_or_path` (and warns
    when they differ); a model built in code has none, so it takes the name the config gives it.
    """
    get_family(model.config)
    if lora_config.base_model_name_or_path and not model.__dict__.get("name_or_path"):
        model.name_or_path = lora_config.base_model_name_or_path
    return _get_peft_model(model, lora_config)


def _strip_base_layer(name: str) -> str:
    while ".base_layer" in name:
        name = name.replace(".base_layer", "", 1)
    return name


def expert_layout_from_peft_model(model: PeftModel, adapter_name: str = ADAPTER_NAME) -> ExpertLayout:
    """Read every LoRA pair of `adapter_name` off the model's PEFT layers."""
    config = model.get_base_model().config
    family = get_family(config)
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        lora_a = module.lora_A[adapter_name].weight
        lora_b = module.lora_B[adapter_name].weight
        parameter = getattr(module, "parameter_name", None)
        num_experts = getattr(module, "num_experts", 1) if isinstance(module, ParamWrapper) else 1
        plain = _strip_base_layer(name)
        if num_experts > 1:
            kind = "expert"
        elif isinstance(module, ParamWrapper) and plain.endswith(family.router_path):
            kind = "router"
        else:
            kind = "dense"
        rank = module.r[adapter_name]
        transposed = bool(getattr(module.get_base_layer(), "is_transposed", False)) and num_experts > 1
        pairs.append(
            LoraPair(
                a_key=f"{name}.lora_A.weight",
                b_key=f"{name}.lora_B.weight",
                module=name,
                parameter=parameter,
                kind=kind,
                layer=layer_index(name),
                num_experts=num_experts,
                rank=rank,
                in_features=int(lora_a.shape[1]),
                out_features=int(lora_b.shape[0]),
                scaling=float(module.scaling[adapter_name]),
                transposed=transposed,
            )
        )
    return ExpertLayout(
        pairs=pairs,
        num_layers=int(config.num_hidden_layers),
        num_experts=family.num_experts(config),
        top_k=family.top_k(config),
        model_type=config.model_type,
    )


def expert_layout_from_configs(model_config: PretrainedConfig, lora_config: LoraConfig) -> ExpertLayout:
    """The layout of `lora_config` on a model of `model_config`, built on the meta device (no weights)."""
    get_family(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
        peft_model = _get_peft_model(model, lora_config)
    return expert_layout_from_peft_model(peft_model)
