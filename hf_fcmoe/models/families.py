"""MoE families of transformers 5.x: where experts, router, shared experts and attention live.

A family is read off the model itself (`hf_fcmoe.models.discovery`): every model type whose transformers
model keeps its experts as fused 3D parameters (``<moe>.experts.gate_up_proj``/``up_proj`` and
``down_proj``) is a family, with its router, shared experts, attention projections, expert count and
top-k found on a small meta-device instance. The tiny factory builds random-initialised models with a
locally built byte-level tokenizer, so tests and demos never touch the network.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hf_fcmoe.models.discovery import UnsupportedMoEError, discover, moe_model_types, read_attr
from hf_fcmoe.models.tokenization import build_byte_tokenizer


@dataclass(frozen=True)
class MoEFamily:
    """Names that locate the MoE parts of one transformers model type (paths relative to a decoder layer)."""

    model_type: str
    moe_module: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    expert_parameters: tuple[str, ...] = ("gate_up_proj", "down_proj")
    num_experts_attr: str = "num_local_experts"
    top_k_attr: str = "num_experts_per_tok"
    attention_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    shared_expert_modules: tuple[str, ...] = ()
    tiny_kwargs: dict = field(default_factory=dict)
    attention_module: str = "self_attn"
    # how the fused experts store their weights (transformers' `use_experts_implementation` flags)
    is_transposed: bool = False
    is_concatenated: bool = True
    has_bias: bool = False
    has_gate: bool = True
    decorated: bool = True  # False: experts with 3D weights but no experts interface (llama4)
    default_top_k: int = 2

    @property
    def router_path(self) -> str:
        """Module path of the router inside a decoder layer, e.g. ``mlp.gate``."""
        return f"{self.moe_module}.{self.router}"

    @property
    def experts_path(self) -> str:
        return f"{self.moe_module}.{self.experts}"

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(read_attr(config, self.num_experts_attr))

    def top_k(self, config: PretrainedConfig) -> int:
        value = read_attr(config, self.top_k_attr) if self.top_k_attr else None
        return int(value) if value is not None else self.default_top_k


_TINY_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Tiny sizes of the families the tests and recipes have always used (kept exactly); every other family's
# tiny config comes from `tiny_configs.shrunk_config`.
_TINY_KWARGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        intermediate_size=64,
        decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=64, head_dim=16
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}


_FAMILY_CACHE: dict[str, MoEFamily] = {}


def _family_of_type(model_type: str, config: PretrainedConfig | None = None) -> MoEFamily:
    """Discovered once per model type (from the type's default config, else from `config` itself)."""
    if model_type not in _FAMILY_CACHE:
        _FAMILY_CACHE[model_type] = _family_from(discover(config if config is not None else model_type))
    return _FAMILY_CACHE[model_type]


def _family_from(found) -> MoEFamily:
    model_type = found.model_type
    return MoEFamily(
        model_type=model_type,
        moe_module=found.moe_module,
        router=found.router,
        experts=found.experts,
        expert_parameters=found.expert_parameters,
        num_experts_attr=found.num_experts_attr,
        top_k_attr=found.top_k_attr,
        attention_modules=found.attention_modules,
        shared_expert_modules=found.shared_expert_modules,
        tiny_kwargs=_TINY_KWARGS.get(model_type, {}),
        attention_module=found.attention_module,
        is_transposed=found.is_transposed,
        is_concatenated=found.is_concatenated,
        has_bias=found.has_bias,
        has_gate=found.has_gate,
        decorated=found.decorated,
        default_top_k=found.top_k,
    )


def get_family(config: PretrainedConfig | str) -> MoEFamily:
    """The family of a config (or model_type); a clear error for anything that is not a supported MoE."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"model_type {model_type!r} is not a supported Mixture-of-Experts family")
    if not isinstance(config, str) and getattr(config, "text_config", None) is not None:
        text_type = getattr(config.text_config, "model_type", None)
        raise UnsupportedMoEError(
            f"model_type {model_type!r} is not supported because it is a multimodal wrapper; "
            f"fine-tune its language model (model_type {text_type!r}) instead"
        )
    return _family_of_type(model_type, None if isinstance(config, str) else config)


class _DiscoveredFamilies(Mapping):
    """model_type -> MoEFamily for every supported family of the installed transformers (discovered lazily)."""

    def __getitem__(self, model_type: str) -> MoEFamily:
        try:
            return get_family(model_type)
        except ValueError as error:
            raise KeyError(model_type) from error

    @staticmethod
    @lru_cache(maxsize=1)
    def _supported() -> tuple[str, ...]:
        out = []
        for model_type in moe_model_types():
            try:
                _family_of_type(model_type)
            except ValueError:
                continue
            out.append(model_type)
        return tuple(out)

    def __iter__(self) -> Iterator[str]:
        return iter(self._supported())

    def __len__(self) -> int:
        return len(self._supported())

    def __contains__(self, model_type: object) -> bool:
        return isinstance(model_type, str) and model_type in self._supported()


FAMILIES: Mapping[str, MoEFamily] = _DiscoveredFamilies()


def tiny_moe_config(model_type: str = "mixtral", vocab_size: int | None = None, **overrides) -> PretrainedConfig:
    """A tiny random-init config of `model_type` (hidden 64, 2 layers, 4 experts, top-2) for tests and demos."""
    from hf_fcmoe.models.tiny_configs import shrunk_config

    family = get_family(model_type)
    tokenizer = build_byte_tokenizer()
    tokens = {
        "vocab_size": vocab_size or len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family.tiny_kwargs:
        return AutoConfig.for_model(model_type, **{**_TINY_COMMON, **family.tiny_kwargs, **tokens, **overrides})
    return shrunk_config(AutoConfig.for_model(model_type), **tokens, **overrides)


def build_tiny_moe(model_type: str = "mixtral", seed: int = 0, **overrides) -> tuple[PreTrainedModel, object]:
    """A random-initialised tiny MoE causal LM and its local tokenizer, reproducible for a seed."""
    config = tiny_moe_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model, build_byte_tokenizer()


def assert_moe_model(model_or_config) -> MoEFamily:
    """The family of a model/config, raising a clear error (naming the model type) when it is not MoE."""
    config = getattr(model_or_config, "config", model_or_config)
    return get_family(config)
