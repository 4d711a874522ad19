"""Mixtral-style MoE families in transformers 5.x: where experts, router and attention live.

Every family here uses fused experts (`<moe>.experts.gate_up_proj` (E, 2I, H) and
`<moe>.experts.down_proj` (E, H, I)) and a top-k router whose forward returns
`(router_logits, scores, top_k_index)`. The tiny factory builds random-initialised models with a
locally built byte-level tokenizer, so tests and demos never touch the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hf_fcmoe.models.tokenization import build_byte_tokenizer


@dataclass(frozen=True)
class MoEFamily:
    """Names that locate the MoE parts of one transformers model type."""

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

    @property
    def router_path(self) -> str:
        """Module path of the router inside a decoder layer, e.g. ``mlp.gate``."""
        return f"{self.moe_module}.{self.router}"

    @property
    def experts_path(self) -> str:
        return f"{self.moe_module}.{self.experts}"

    def num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_attr))

    def top_k(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.top_k_attr))


_TINY_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

FAMILIES: dict[str, MoEFamily] = {
    family.model_type: family
    for family in (
        MoEFamily("mixtral", tiny_kwargs=dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
        MoEFamily(
            "qwen2_moe",
            num_experts_attr="num_experts",
            shared_expert_modules=("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"),
            tiny_kwargs=dict(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=64,
                shared_expert_intermediate_size=64,
                intermediate_size=64,
                decoder_sparse_step=1,
            ),
        ),
        MoEFamily(
            "qwen3_moe",
            num_experts_attr="num_experts",
            tiny_kwargs=dict(
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=64, head_dim=16
            ),
        ),
        MoEFamily(
            "olmoe",
            num_experts_attr="num_experts",
            tiny_kwargs=dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64),
        ),
        MoEFamily(
            "phimoe",
            router="router",
            tiny_kwargs=dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
        ),
        MoEFamily(
            "granitemoe",
            moe_module="block_sparse_moe",
            router="router",
            tiny_kwargs=dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
        ),
    )
}


def get_family(config: PretrainedConfig | str) -> MoEFamily:
    """The family of a config (or model_type); a clear error for anything that is not a supported MoE."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts family; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def tiny_moe_config(model_type: str = "mixtral", vocab_size: int | None = None, **overrides) -> PretrainedConfig:
    """A tiny random-init config of `model_type` (hidden 64, 2 layers, 4 experts, top-2) for tests and demos."""
    family = get_family(model_type)
    tokenizer = build_byte_tokenizer()
    kwargs = {
        **_TINY_COMMON,
        **family.tiny_kwargs,
        "vocab_size": vocab_size or len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }
    return AutoConfig.for_model(model_type, **kwargs)


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
