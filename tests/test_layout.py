"""ExpertLayout: slicing matches PEFT's ParamWrapper.get_delta_weight exactly, for every family."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import LoraLayer

from hf_fcmoe.adapters.layout import (
    ExpertLayout,
    merge_expert_a,
    merge_expert_b,
    split_expert_a,
    split_expert_b,
)
from hf_fcmoe.adapters.lora import (
    apply_expert_lora,
    build_lora_config,
    expert_layout_from_configs,
    expert_layout_from_peft_model,
)
from hf_fcmoe.models.families import FAMILIES, build_tiny_moe, get_family  # per-family checks: test_families.py


def _randomized_peft_model(model_type: str, targets: list[str]):
    model, _ = build_tiny_moe(model_type, seed=1)
    family = get_family(model.config)
    lora_config = build_lora_config(family, r=4, targets=targets)
    peft_model = apply_expert_lora(model, lora_config)
    generator = torch.Generator().manual_seed(0)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            weight = module.lora_B["default"].weight
            weight.data = torch.randn(weight.shape, generator=generator)
    return peft_model, lora_config


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_layout_from_configs_needs_no_weights(model_type):
    peft_model, lora_config = _randomized_peft_model(model_type, ["experts", "router", "attention"])
    from_model = expert_layout_from_peft_model(peft_model)
    from_configs = expert_layout_from_configs(peft_model.get_base_model().config, lora_config)
    assert from_configs.to_dict() == from_model.to_dict()
    assert ExpertLayout.from_dict(from_model.to_dict()).to_dict() == from_model.to_dict()


def test_expert_tensor_names_follow_wrapper_parameter_names():
    peft_model, _ = _randomized_peft_model("mixtral", ["experts"])
    layout = expert_layout_from_peft_model(peft_model)
    by_param = {pair.parameter: pair for pair in layout.by_kind("expert") if pair.layer == 0}
    config = peft_model.get_base_model().config
    assert by_param["gate_up_proj"].in_features == config.hidden_size
    assert by_param["gate_up_proj"].out_features == 2 * config.intermediate_size
    assert by_param["down_proj"].in_features == config.intermediate_size


def test_split_and_merge_are_inverse():
    a = torch.randn(4 * 3, 10)
    b = torch.randn(7, 4 * 3)
    torch.testing.assert_close(merge_expert_a(split_expert_a(a, 4)), a)
    torch.testing.assert_close(merge_expert_b(split_expert_b(b, 4)), b)
    # expert e's B is the strided column set B[:, e::E]
    torch.testing.assert_close(split_expert_b(b, 4)[1], b[:, 1::4])
    torch.testing.assert_close(split_expert_a(a, 4)[2], a[6:9])


def test_non_moe_model_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="'llama' is not a supported Mixture-of-Experts"):
        get_family(LlamaConfig())


def test_unknown_lora_target_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        build_lora_config(FAMILIES["mixtral"], targets=["experts", "mlp"])
