"""Every MoE model type of the installed transformers: discovered layout, exact per-expert slicing, exact forward.

For each model type with experts, a tiny config is built, expert + router + attention (+ shared expert) LoRA
is attached with random factors, and two things are checked: the delta rebuilt from the layout's slices equals
`ParamWrapper.get_delta_weight` (per expert, too), and the adapted forward equals the base forward with
``W + delta`` substituted into a copy of the base model. Families that cannot work must say why in one line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora.layer import LoraLayer

from hf_fcmoe.adapters.lora import (
    apply_expert_lora,
    build_lora_config,
    expert_layout_from_configs,
    expert_layout_from_peft_model,
)
from hf_fcmoe.models.discovery import UnsupportedMoEError, moe_model_types
from hf_fcmoe.models.families import FAMILIES, build_tiny_moe, get_family
from hf_fcmoe.models.family_support import UNSUPPORTED, UNTESTED
from hf_fcmoe.models.family_support import tested_model_types as covered_model_types  # not a test: renamed

REQUIRED = (
    "gpt_oss",
    "deepseek_v3",
    "deepseek_v2",
    "glm4_moe",
    "qwen3_next",
    "llama4_text",
    "granitemoe",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "phimoe",
)


def _randomize(peft_model) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for factor in (module.lora_A["default"], module.lora_B["default"]):
                factor.weight.data = torch.randn(factor.weight.shape, generator=generator) * 0.05


def _base_name(pair) -> str:
    """The base model's parameter a LoRA pair adapts, e.g. ``model.layers.0.mlp.experts.gate_up_proj``."""
    module = pair.module.removeprefix("base_model.model.").replace(".base_layer", "")
    return f"{module}.{pair.parameter or 'weight'}"


@pytest.mark.parametrize("model_type", covered_model_types())
def test_family_layout_and_forward_are_exact(model_type):
    if model_type in UNSUPPORTED:
        with pytest.raises(UnsupportedMoEError, match=f"model_type '{model_type}' is not supported because"):
            get_family(model_type)
        return
    family = get_family(model_type)
    model, _ = build_tiny_moe(model_type, seed=1)
    model.eval()
    base = copy.deepcopy(model)
    targets = ["experts", "router"] + (["attention"] if family.attention_modules else [])
    targets += ["shared_experts"] if family.shared_expert_modules else []
    lora_config = build_lora_config(family, r=2, lora_alpha=4, targets=targets)
    peft_model = apply_expert_lora(model, lora_config)
    _randomize(peft_model)
    layout = expert_layout_from_peft_model(peft_model)
    state = get_peft_model_state_dict(peft_model)
    assert set(state) == set(layout.keys)
    has_dense = "attention" in targets or "shared_experts" in targets
    assert {pair.kind for pair in layout.pairs} == {"expert", "router"} | ({"dense"} if has_dense else set())
    assert layout.num_experts == family.num_experts(model.config) > 1
    modules = dict(peft_model.named_modules())
    for pair in layout.pairs:
        expected = modules[pair.module].get_delta_weight("default")
        torch.testing.assert_close(pair.delta(state), expected, rtol=0, atol=0)
    for pair in layout.by_kind("expert"):  # each expert's delta from its own slices alone
        b, a = pair.expert_factors(state)
        full = modules[pair.module].get_delta_weight("default")
        for e in range(pair.num_experts):
            delta_e = pair.scaling * b[e] @ a[e]
            torch.testing.assert_close(delta_e.T if pair.transposed else delta_e, full[e], rtol=1e-6, atol=1e-6)
    # every targeted weight got LoRA: shared experts and attention are not silently dropped
    adapted = {_base_name(pair) for pair in layout.pairs}
    for name in family.shared_expert_modules if "shared_experts" in targets else ():
        assert any(f".{family.moe_module}.{name}.weight" in key for key in adapted), name
    # the adapted forward is the base forward with W + delta substituted
    base_params = dict(base.named_parameters())
    with torch.no_grad():
        for pair in layout.pairs:
            base_params[_base_name(pair)].add_(pair.delta(state).to(base_params[_base_name(pair)].dtype))
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        adapted_logits = peft_model(input_ids=ids, use_cache=False).logits
        merged_logits = base(input_ids=ids, use_cache=False).logits
        with peft_model.disable_adapter():
            plain_logits = peft_model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(adapted_logits, plain_logits, rtol=1e-4, atol=1e-4)  # the LoRA does act
    torch.testing.assert_close(adapted_logits, merged_logits, rtol=1e-4, atol=1e-4)
    # the server-side layout needs only the configs (meta device)
    assert expert_layout_from_configs(model.config, lora_config).to_dict() == layout.to_dict()


def test_enough_families_and_the_required_ones_are_supported():
    supported = [mt for mt in covered_model_types() if mt not in UNSUPPORTED]
    assert len(supported) >= 20, supported
    assert set(REQUIRED) <= set(supported)
    assert set(REQUIRED) <= set(FAMILIES)


def test_support_tables_name_only_real_moe_types():
    assert set(UNSUPPORTED) | set(UNTESTED) <= set(moe_model_types())
    assert not set(UNSUPPORTED) & set(UNTESTED)


def test_non_moe_and_missing_targets_are_refused_in_one_line():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="'llama' is not a supported Mixture-of-Experts"):
        get_family(LlamaConfig())
    with pytest.raises(ValueError, match="'shared_experts' does not exist in model_type 'mixtral'"):
        build_lora_config(get_family("mixtral"), targets=["experts", "shared_experts"])


@pytest.mark.parametrize("model_type", ["deepseek_v3", "llama4_text", "gpt_oss"])
def test_expert_token_counts_for_discovered_families(model_type):
    from hf_fcmoe.training.callbacks import ExpertTokenCounter

    model, _ = build_tiny_moe(model_type, seed=0)
    family = get_family(model_type)
    model.train()
    counter = ExpertTokenCounter(model)
    model(input_ids=torch.randint(0, model.config.vocab_size, (2, 5)), use_cache=False)
    counts = counter.counts
    moe_layers = [layer for layer in range(counts.shape[0]) if counts[layer].sum() > 0]
    assert moe_layers  # some layer routed tokens
    for layer in moe_layers:  # each of the 10 tokens went to exactly top_k experts
        assert int(counts[layer].sum()) == 10 * family.top_k(model.config)


def test_readme_lists_every_family_with_its_status():
    from pathlib import Path

    from hf_fcmoe.models.family_support import support_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_table() in readme, "regenerate with: python -m hf_fcmoe.models.family_support"


@pytest.mark.parametrize("jitter", [0.01, 0.5])
def test_phimoe_router_lora_learns_only_from_tokens_near_a_routing_tie(jitter):
    """PhiMoE's SparseMixer sends the router a gradient only for tokens whose runner-up expert lies within
    2 * router_jitter_noise of the winner (relative): with the config's 0.01 most tokens give an exact zero, a wider
    band gives every layer a gradient. Either way it is a tensor, so DDP without unused-parameter search reduces it."""
    torch.manual_seed(0)  # the Gumbel sampling of training mode
    model, _ = build_tiny_moe("phimoe", seed=1)
    model.config.router_jitter_noise = jitter
    for module in model.modules():
        if hasattr(module, "router_jitter_noise"):
            module.router_jitter_noise = jitter
    family = get_family("phimoe")
    peft_model = apply_expert_lora(model, build_lora_config(family, r=2, lora_alpha=4, targets=["experts", "router"]))
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model.train()(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if ".router.lora_B." in n]
    assert len(grads) == model.config.num_hidden_layers and all(g is not None for g in grads)
    if jitter == 0.5:
        assert all(g.abs().sum() > 0 for g in grads)
    else:
        assert any(g.abs().sum() == 0 for g in grads)
