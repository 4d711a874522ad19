"""Read an MoE family's layout off the transformers model itself.

transformers 5.x marks its fused expert classes with `use_experts_implementation(is_transposed=,
is_concatenated=, has_bias=, has_gate=)`: every instance then carries those flags and 3D parameters
``gate_up_proj`` (or ``up_proj`` without a gate) and ``down_proj``, (E, out, in) or (E, in, out) when
transposed. Building the model on the meta device (no memory, any size) and walking its modules tells
where the experts, the router (the (E, hidden) weight next to them), the shared experts and the attention
projections live, and how many experts there are. What cannot be read off a module (the config attribute
holding top-k, the sizes of a tiny config) lives in the small tables below.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# decoder-layer containers: `model.layers.N` (most), `transformer.blocks.N` (dbrx)
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")
# config attributes that hold top-k (routers without a `top_k` attribute); the first present wins
TOP_K_ATTRS = ("num_experts_per_tok", "moe_top_k", "moe_topk", "moe_k", "num_experts_per_token", "top_k")
# config attributes that hold the number of routed experts (matched against the experts' leading dimension)
NUM_EXPERTS_ATTRS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "ffn_config.moe_num_experts",
)
ATTENTION_CHILDREN = ("self_attn", "attention", "attn", "norm_attn_norm.attn")


class UnsupportedMoEError(ValueError):
    """A model type whose experts PEFT cannot adapt per expert (the message says why)."""


@dataclass(frozen=True)
class Discovered:
    """Everything read off one model instance (paths are relative to a decoder layer)."""

    model_type: str
    moe_module: str
    router: str
    experts: str
    expert_parameters: tuple[str, ...]
    num_experts: int
    num_experts_attr: str
    top_k: int
    top_k_attr: str
    attention_module: str
    attention_modules: tuple[str, ...]
    shared_expert_modules: tuple[str, ...]
    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    has_gate: bool
    decorated: bool
    router_is_linear: bool
    moe_layers: tuple[int, ...] = field(default=())


def read_attr(config: PretrainedConfig, dotted: str):
    """`config.a.b` for a dotted name (dbrx keeps its expert count in `ffn_config`)."""
    value = config
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part, None)
        if value is None:
            return None
    return value


def _is_layer_name(name: str) -> bool:
    """``model.layers.3`` itself (not a module inside it)."""
    match = LAYER_RE.search(name + ".")
    return match is not None and match.end() == len(name) + 1


def layer_of(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def relative_to_layer(name: str) -> str:
    match = LAYER_RE.search(name)
    return name[match.end() :] if match else name


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module whose weights are 3D (E, ., .) parameters (decorated or not, e.g. llama4)."""
    direct = dict(module.named_parameters(recurse=False))
    return "down_proj" in direct and direct["down_proj"].dim() == 3


def _modeling_source(model_type: str) -> str | None:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    spec = importlib.util.find_spec(f"transformers.models.{module}")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / f"modeling_{module}.py"
    return path.read_text() if path.exists() else None


_EXPERTS_CLASS_RE = re.compile(r"class \w+Experts\(")


def has_experts_code(model_type: str) -> bool:
    """Whether transformers' modeling file of `model_type` defines experts at all (decorated or a class)."""
    source = _modeling_source(model_type)
    return source is not None and ("use_experts_implementation" in source or bool(_EXPERTS_CLASS_RE.search(source)))


def moe_model_types() -> list[str]:
    """Every causal-LM model type of the installed transformers whose modeling code defines experts."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(mt for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if mt in CONFIG_MAPPING and has_experts_code(mt))


def _first_layer_prefix(model: nn.Module, experts_name: str) -> str:
    match = LAYER_RE.search(experts_name)
    return experts_name[: match.end()]


def _find_router(moe: nn.Module, moe_name: str, experts_rel: str, num_experts: int, hidden: int) -> tuple[str, bool]:
    """The module (relative to the MoE block) owning an (E, hidden) `weight`: the router."""
    for name, module in moe.named_modules():
        if name == experts_rel or name.startswith(experts_rel + "."):
            continue
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None and tuple(weight.shape) == (num_experts, hidden):
            return name, isinstance(module, nn.Linear)
    raise UnsupportedMoEError(f"no router weight of shape ({num_experts}, {hidden}) next to the experts in {moe_name}")


def _top_k(config: PretrainedConfig, moe: nn.Module, router: nn.Module) -> tuple[int, str]:
    for attr in TOP_K_ATTRS:
        value = read_attr(config, attr)
        if isinstance(value, int) and not isinstance(value, bool):
            return value, attr
    for module in (router, moe):
        value = getattr(module, "top_k", None)
        if isinstance(value, int):
            return value, ""
    raise UnsupportedMoEError(f"cannot tell top-k: none of the config attributes {list(TOP_K_ATTRS)} is set")


def _num_experts_attr(config: PretrainedConfig, num_experts: int) -> str:
    for attr in NUM_EXPERTS_ATTRS:
        if read_attr(config, attr) == num_experts:
            return attr
    raise UnsupportedMoEError(f"no config attribute among {list(NUM_EXPERTS_ATTRS)} equals the {num_experts} experts")


def _attention(layers: list[nn.Module]) -> tuple[str, tuple[str, ...]]:
    """The softmax-attention child of the decoder layers (hybrids have it in some layers only) and its Linears."""
    for child in ATTENTION_CHILDREN:
        names: dict[str, None] = {}
        for layer in layers:
            if _has_submodule(layer, child):
                module = layer.get_submodule(child)
                names.update({n: None for n, m in module.named_modules() if n and isinstance(m, nn.Linear)})
        if names:
            return child, tuple(names)
    return "self_attn", ()


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def discover_from_model(model: nn.Module) -> Discovered:
    """Read the family layout off an instantiated (meta or real) causal LM."""
    config = model.config
    model_type = config.model_type
    fused = [(n, m) for n, m in model.named_modules() if is_fused_experts(m) and layer_of(n) is not None]
    if not fused:
        listed = [n for n, m in model.named_modules() if n.endswith("experts") and isinstance(m, nn.ModuleList)]
        reason = (
            "its experts are an nn.ModuleList of separate MLPs, not fused 3D parameters"
            if listed
            else "it has no fused expert parameters (3D gate_up_proj/up_proj and down_proj) in its decoder layers"
        )
        raise UnsupportedMoEError(f"model_type {model_type!r} is not supported because {reason}")
    experts_name, experts = fused[0]
    rel_experts = relative_to_layer(experts_name)
    if "." not in rel_experts:
        raise UnsupportedMoEError(f"model_type {model_type!r} is not supported because its experts have no block")
    moe_rel, experts_attr = rel_experts.rsplit(".", 1)
    layer_prefix = _first_layer_prefix(model, experts_name)
    moe_name = layer_prefix + moe_rel
    moe = model.get_submodule(moe_name)
    params = dict(experts.named_parameters(recurse=False))
    names = ("gate_up_proj", "up_proj", "down_proj")
    expert_parameters = tuple(n for n in names if n in params and params[n].dim() == 3)
    other_3d = sorted(n for n, p in params.items() if p.dim() == 3 and n not in expert_parameters)
    if other_3d:
        reason = f"its experts hold 3D tensors {other_3d} besides gate_up_proj/up_proj/down_proj"
        raise UnsupportedMoEError(f"model_type {model_type!r} is not supported because {reason}")
    num_experts = int(params["down_proj"].shape[0])
    is_transposed = bool(getattr(experts, "is_transposed", False))
    decorated = hasattr(experts, "is_concatenated")
    # hidden size = the down projection's output side
    down = params["down_proj"]
    # (undecorated llama4-style experts compute `x @ W_e`, stored (E, in, out) like the transposed ones)
    hidden = int(down.shape[2] if is_transposed or not decorated else down.shape[1])
    router_rel, router_is_linear = _find_router(moe, moe_name, experts_attr, num_experts, hidden)
    router = moe.get_submodule(router_rel)
    top_k, top_k_attr = _top_k(config, moe, router)
    layers = [m for n, m in model.named_modules() if _is_layer_name(n)]
    attention_module, attention_modules = _attention(layers)
    shared = tuple(
        n
        for n, m in moe.named_modules()
        if isinstance(m, nn.Linear)
        and "shared" in n
        and m.out_features > 1
        and not n.startswith(router_rel)
        and not n.startswith(experts_attr + ".")
    )
    moe_layers = tuple(sorted({layer_of(n) for n, _ in fused if relative_to_layer(n) == rel_experts}))
    return Discovered(
        model_type=model_type,
        moe_module=moe_rel,
        router=router_rel,
        experts=experts_attr,
        expert_parameters=expert_parameters,
        num_experts=num_experts,
        num_experts_attr=_num_experts_attr(config, num_experts),
        top_k=top_k,
        top_k_attr=top_k_attr,
        attention_module=attention_module,
        attention_modules=attention_modules,
        shared_expert_modules=shared,
        is_transposed=is_transposed,
        is_concatenated=bool(getattr(experts, "is_concatenated", True)),
        has_bias=any(n.endswith("_bias") for n in params),
        has_gate="gate_up_proj" in expert_parameters,
        decorated=decorated,
        router_is_linear=router_is_linear,
        moe_layers=moe_layers,
    )


def build_on_meta(config: PretrainedConfig) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device: no memory, any size."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


@cache
def _discover_type(model_type: str) -> Discovered:
    from hf_fcmoe.models.tiny_configs import shrunk_config

    return discover_from_model(build_on_meta(shrunk_config(AutoConfig.for_model(model_type))))


def discover(config: PretrainedConfig | str) -> Discovered:
    """The discovered layout of a model type (cached per type; read off a small meta-device instance)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING or not has_experts_code(model_type):
        raise ValueError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts family: transformers' model has no "
            "experts (pick an MoE such as mixtral, qwen3_moe, olmoe, gpt_oss, deepseek_v3)"
        )
    from hf_fcmoe.models.family_support import UNSUPPORTED

    if model_type in UNSUPPORTED:
        raise UnsupportedMoEError(f"model_type {model_type!r} is not supported because {UNSUPPORTED[model_type]}")
    if not isinstance(config, str):
        try:
            return _discover_type(model_type)
        except Exception:  # a real config may build where the type's default (shrunk) one does not: read it on meta
            try:
                return discover_from_model(build_on_meta(config))
            except Exception:
                pass  # the type-level reason below is the one to report
    try:
        return _discover_type(model_type)
    except UnsupportedMoEError as error:
        if "is not supported because" in str(error):
            raise
        raise UnsupportedMoEError(f"model_type {model_type!r} is not supported because {error}") from error
    except Exception as error:  # a config/model that does not build: say which and why, in one line
        raise UnsupportedMoEError(
            f"model_type {model_type!r} is not supported because its model does not build from a small config: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
