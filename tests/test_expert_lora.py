"""Routed-token expert LoRA: the same outputs and gradients as PEFT's ParamWrapper, in PEFT's own adapter layout.

Every comparison runs one model twice from the same RNG state: once through PEFT's path (W + delta
materialised per expert) and once through the routed path, and checks logits and the gradient of every
LoRA parameter (fp32: 1e-5 relative, in norm, per tensor).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora.layer import LoraLayer
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCausalLM

from hf_fcmoe.models.families import build_tiny_moe
from hf_fcmoe.training import expert_lora
from hf_fcmoe.training.expert_lora import (
    ROUTED_IMPLEMENTATION,
    configure_expert_lora_forward,
    expert_wrappers,
    is_routed,
)
from tests.conftest import local_round_args

# PEFT 0.21 reads the deprecated `is_gradient_checkpointing` on every get_peft_model (the library mutes it around
# its own call, adapters/peft_quirks.py); these tests call PEFT directly
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "gpt_oss")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _tiny_gpt_oss():
    config = AutoConfig.for_model(
        "gpt_oss",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # gpt-oss initialises its biases at zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def _base(model_type: str, dtype: torch.dtype = torch.float32):
    model = _tiny_gpt_oss() if model_type == "gpt_oss" else build_tiny_moe(model_type, seed=1)[0]
    return model.to(dtype)


def _paths(model) -> tuple[str, str]:
    """(experts path, router path) inside a decoder layer, read off the module tree."""
    name = next(n for n, m in model.named_modules() if expert_lora._is_fused_experts(m))
    experts = name.split(".layers.0.", 1)[1]
    moe = experts.rsplit(".", 1)[0]
    children = dict(model.get_submodule(name.rsplit(".", 1)[0]).named_children())
    router = next(child for child in ("gate", "router") if child in children)
    return experts, f"{moe}.{router}"


def _lora_config(model, router: bool, attention: bool, r: int = 4) -> LoraConfig:
    experts, router_path = _paths(model)
    parameters = [f"{experts}.gate_up_proj", f"{experts}.down_proj"] + ([f"{router_path}.weight"] if router else [])
    return LoraConfig(
        r=r, lora_alpha=2 * r, target_parameters=parameters, target_modules=ATTENTION if attention else None
    )


def _peft_model(model_type: str, router: bool = True, attention: bool = True, dtype=torch.float32) -> PeftModel:
    base = _base(model_type, dtype)
    model = get_peft_model(base, _lora_config(base, router, attention))
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, LoraLayer):  # non-zero A and B, so both factors get gradients
            for factor in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                factor.data = (0.2 * torch.randn(factor.shape, generator=generator)).to(factor.dtype)
    return model.train()


def _batch(model, seed: int = 0) -> torch.Tensor:
    vocab = model.get_base_model().config.vocab_size
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _step(model: PeftModel, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradient of every trainable parameter for one forward/backward from a fixed RNG state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # phimoe's router jitters in training mode
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    error = (actual.float() - expected.float()).norm().item()
    scale = expected.float().norm().item()
    assert error <= rtol * scale + 1e-12, f"{what}: relative error {error / max(scale, 1e-30):.2e} > {rtol}"


def _assert_same_step(peft, routed, rtol: float = 1e-5) -> None:
    (peft_logits, peft_grads), (routed_logits, routed_grads) = peft, routed
    _assert_close(routed_logits, peft_logits, rtol, "logits")
    assert routed_grads.keys() == peft_grads.keys()
    for name, grad in peft_grads.items():
        if ".experts." in name:  # (phimoe's router: zero gradient outside SparseMixer's band)
            assert grad.abs().sum() > 0, f"{name} got no gradient (the comparison would be vacuous)"
        _assert_close(routed_grads[name], grad, rtol, name)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize(("router", "attention"), [(False, False), (True, True)], ids=["experts", "all"])
def test_routed_matches_peft_outputs_and_gradients(model_type, router, attention):
    model = _peft_model(model_type, router=router, attention=attention)
    ids = _batch(model)
    peft = _step(model, ids)
    assert configure_expert_lora_forward(model, "routed") and is_routed(model)
    assert model.get_base_model().config._experts_implementation == ROUTED_IMPLEMENTATION
    _assert_same_step(peft, _step(model, ids))
    # and back: the switch restores PEFT's path and the implementation the model had
    assert not configure_expert_lora_forward(model, "peft")
    assert model.get_base_model().config._experts_implementation == "grouped_mm"
    back_logits, _ = _step(model, ids)
    torch.testing.assert_close(back_logits, peft[0], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routed_matches_peft_with_activation_checkpointing(model_type):
    model = _peft_model(model_type)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = _batch(model)
    peft = _step(model, ids)
    configure_expert_lora_forward(model, "routed")
    _assert_same_step(peft, _step(model, ids))


def test_routed_matches_peft_with_reentrant_checkpointing_and_eager_experts():
    base = _base("mixtral")
    base.set_experts_implementation("eager")
    model = get_peft_model(base, _lora_config(base, router=True, attention=True))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
    model.train()
    model.enable_input_require_grads()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ids = _batch(model)
    peft = _step(model, ids)
    assert configure_expert_lora_forward(model, "routed")
    _assert_same_step(peft, _step(model, ids))
    configure_expert_lora_forward(model, "peft")
    assert model.get_base_model().config._experts_implementation == "eager"


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def test_routed_bf16_is_as_accurate_as_peft_bf16():
    """bf16 rounds differently on the two paths (PEFT rounds W + delta, routed rounds the low-rank term), so
    both are held against fp32 arithmetic on the same bf16 weights: routed's error is at most 2x PEFT's own
    (measured: logits 2.7% vs 2.5%, worst gradient tensor 1.43x; routed vs PEFT directly: logits 1.3%,
    gradients 1-8%)."""
    model = _peft_model("mixtral", dtype=torch.bfloat16)
    ids = _batch(model)
    reference_logits, reference_grads = _step(copy.deepcopy(model).float(), ids)
    peft_logits, peft_grads = _step(model, ids)
    configure_expert_lora_forward(model, "routed")
    routed_logits, routed_grads = _step(model, ids)
    peft_error = _relative_error(peft_logits, reference_logits)
    assert _relative_error(routed_logits, reference_logits) <= 2 * peft_error
    for name, reference in reference_grads.items():
        peft_error = _relative_error(peft_grads[name], reference)
        assert _relative_error(routed_grads[name], reference) <= 2 * peft_error + 1e-3, name


def test_delta_applied_once_and_never_materialised():
    """Under the routed path no expert weight is parametrized (PEFT's W + delta) during the forward."""
    model = _peft_model("mixtral")
    seen = []
    for wrapper in expert_wrappers(model):
        experts = wrapper.get_base_layer()
        experts.register_forward_pre_hook(lambda module, args: seen.append(parametrize.is_parametrized(module)))
    ids = _batch(model)
    _step(model, ids)
    assert seen and all(seen)  # PEFT's path does parametrize (so the check below can fail)
    seen.clear()
    configure_expert_lora_forward(model, "routed")
    _step(model, ids)
    assert seen and not any(seen)
    # disabled adapters: the plain base model, on either path
    with model.disable_adapter():
        routed_base = model(input_ids=ids).logits
    configure_expert_lora_forward(model, "peft")
    with model.disable_adapter():
        peft_base = model(input_ids=ids).logits
    torch.testing.assert_close(routed_base, peft_base, rtol=1e-5, atol=1e-6)


def test_expert_without_tokens_gets_zero_gradient():
    model = _peft_model("mixtral", router=False, attention=False)
    layers = model.get_base_model().model.layers

    def only_experts_0_and_1(module, inputs, output):
        logits, scores, index = output
        return logits, scores, torch.tensor([0, 1]).expand_as(index)

    for layer in layers:
        layer.mlp.gate.register_forward_hook(only_experts_0_and_1)
    ids = _batch(model)
    peft = _step(model, ids)
    configure_expert_lora_forward(model, "routed")
    routed = _step(model, ids)
    _assert_same_step(peft, routed)
    for wrapper in expert_wrappers(model):
        name = next(n for n, m in model.named_modules() if m is wrapper)
        num_experts, rank = wrapper.num_experts, wrapper.r["default"]
        grad_a = routed[1][f"{name}.lora_A.default.weight"].reshape(num_experts, rank, -1)
        grad_b = routed[1][f"{name}.lora_B.default.weight"]
        for expert in range(num_experts):
            routed_a, routed_b = grad_a[expert].abs().sum(), grad_b[:, expert::num_experts].abs().sum()
            assert (routed_a > 0 and routed_b > 0) if expert < 2 else (routed_a == 0 and routed_b == 0)


def test_saved_adapter_is_peft_layout_and_loads_in_stock_peft(tmp_path):
    model = _peft_model("gpt_oss")
    ids = _batch(model)
    model.save_pretrained(tmp_path / "peft")
    configure_expert_lora_forward(model, "routed")
    model.save_pretrained(tmp_path / "routed")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "routed" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes()
    model.eval()
    with torch.no_grad():
        routed_logits = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(_base("gpt_oss"), tmp_path / "routed").eval()
    assert not is_routed(loaded)  # stock PEFT, stock experts implementation
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, routed_logits, rtol=1e-5, atol=1e-5)
    state = get_peft_model_state_dict(model)
    assert state.keys() == get_peft_model_state_dict(loaded).keys()


def test_merge_and_unload_through_peft():
    model = _peft_model("qwen2_moe").eval()
    ids = _batch(model)
    configure_expert_lora_forward(model, "routed")
    with torch.no_grad():
        routed_logits = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert not any(isinstance(m, LoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, routed_logits, rtol=1e-4, atol=1e-5)


def test_multiple_adapters_follow_set_adapter():
    model = _peft_model("olmoe", router=False, attention=False).eval()
    model.add_adapter("other", _lora_config(_base("olmoe"), router=False, attention=False))
    for module in model.modules():
        if isinstance(module, LoraLayer) and "other" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["other"].weight, std=0.3)
    ids = _batch(model)
    expected = {}
    with torch.no_grad():
        for name in ("default", "other"):
            model.set_adapter(name)
            expected[name] = model(input_ids=ids).logits
        configure_expert_lora_forward(model, "routed")
        for name in ("other", "default"):
            model.set_adapter(name)
            torch.testing.assert_close(model(input_ids=ids).logits, expected[name], rtol=1e-5, atol=1e-5)


def test_uncovered_implementation_falls_back_with_one_log_line(caplog):
    base = _base("mixtral")
    base.set_experts_implementation("batched_mm")
    model = get_peft_model(base, _lora_config(base, router=False, attention=False))
    with caplog.at_level(logging.INFO, logger=expert_lora.__name__):
        assert not configure_expert_lora_forward(model, "routed")
        assert not configure_expert_lora_forward(model, "routed")  # the same reason is not logged again
    records = [r for r in caplog.records if r.name == expert_lora.__name__]
    assert len(records) == 1 and "batched_mm" in records[0].getMessage()
    assert model.get_base_model().config._experts_implementation == "batched_mm" and not is_routed(model)


def test_lora_on_an_expert_bias_falls_back_with_one_log_line(caplog):
    base = _base("gpt_oss")
    parameters = ["mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, target_parameters=parameters))
    with caplog.at_level(logging.INFO, logger=expert_lora.__name__):
        assert not configure_expert_lora_forward(model, "routed")
    (record,) = [r for r in caplog.records if r.name == expert_lora.__name__]
    assert "GptOssExperts.gate_up_proj_bias" in record.getMessage()
    assert not is_routed(model) and model.get_base_model().config._experts_implementation == "grouped_mm"


def test_peft_mode_and_attention_only_models_log_nothing(caplog):
    model = _peft_model("mixtral")
    base = _base("mixtral")
    dense_only = get_peft_model(base, LoraConfig(r=4, target_modules=ATTENTION))
    with caplog.at_level(logging.INFO, logger=expert_lora.__name__):
        assert not configure_expert_lora_forward(model, "peft")
        assert not configure_expert_lora_forward(dense_only, "routed")
    assert not caplog.records
    with pytest.raises(ValueError, match="expert_lora_forward='fast'"):
        configure_expert_lora_forward(model, "fast")


def test_config_switch_is_validated():
    from hf_fcmoe.config import FederatedMoEConfig

    assert FederatedMoEConfig(output_dir="/tmp/unused", report_to="none").expert_lora_forward == "routed"
    with pytest.raises(ValueError, match="expert_lora_forward='fast'"):
        FederatedMoEConfig(output_dir="/tmp/unused", report_to="none", expert_lora_forward="fast")


def test_trainer_defaults_to_routed_and_counts_the_same_tokens(tmp_path):
    from hf_fcmoe.data.synthetic import synthetic_domains
    from hf_fcmoe.training.trainer import FederatedMoETrainer

    updates = {}
    for mode in ("peft", "routed"):
        model, tokenizer = build_tiny_moe("mixtral", seed=0)
        model = get_peft_model(model, _lora_config(model, router=True, attention=True))
        args = local_round_args(tmp_path / mode, max_steps=3, seed=0, expert_lora_forward=mode)
        trainer = FederatedMoETrainer(
            model, args=args, train_dataset=synthetic_domains(24), processing_class=tokenizer
        )
        assert is_routed(model) == (mode == "routed")
        updates[mode] = trainer.train_round()
    peft, routed = updates["peft"], updates["routed"]
    assert routed.expert_counts.sum() > 0
    torch.testing.assert_close(routed.expert_counts, peft.expert_counts, rtol=0, atol=0)
    assert abs(routed.train_loss - peft.train_loss) < 1e-4
    for key, tensor in peft.state.items():  # 3 AdamW steps from the same start: the same update
        _assert_close(routed.state[key], tensor, 1e-4, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here): checks grouped_mm on GPU")
def test_routed_matches_peft_on_gpu():
    model = _peft_model("mixtral", dtype=torch.bfloat16).cuda()
    ids = _batch(model).cuda()
    peft = _step(model, ids)
    configure_expert_lora_forward(model, "routed")
    _assert_same_step(peft, _step(model, ids), rtol=3e-2)


@pytest.mark.slow
def test_client_round_under_accelerate_ddp_two_cpu_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): routed and peft rounds agree."""
    script = ROOT / "tests" / "fixtures" / "expert_lora_ddp_round.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    cmd += [str(script), str(tmp_path)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["routed_active"] == [True, True]
    assert result["counts_equal"] and result["max_state_diff"] < 1e-4 and result["counts_total"] > 0


@pytest.mark.slow
def test_benchmark_script_small_run(tmp_path):
    """Plumbing of benchmarks/expert_lora.py on a tiny size (no timing asserted)."""
    output = tmp_path / "expert_lora.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "expert_lora.py"), "--sizes", "64x128", "--repeats", "1"]
    cmd += ["--steps", "1", "--warmup", "0", "--output", str(output)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = [line for line in output.read_text().splitlines() if line.startswith("| 64 / 128 |")]
    assert len(rows) == 1 and all(float(cell) > 0 for cell in rows[0].split("|")[2:5])
