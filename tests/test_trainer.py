"""FederatedMoETrainer: one client's local round on a tiny MoE (CPU)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from hf_fcmoe.adapters.lora import apply_expert_lora, build_lora_config, expert_layout_from_peft_model
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.data.synthetic import synthetic_domains
from hf_fcmoe.models.families import build_tiny_moe, get_family
from hf_fcmoe.training.trainer import FederatedMoETrainer, adapter_state
from tests.conftest import local_round_args

NEVER_ROUTED = 3  # expert index the routing hook below removes from layer 0


def _model(targets=("experts", "router")) -> tuple[PeftModel, object]:
    model, tokenizer = build_tiny_moe("mixtral", seed=0)
    peft_model = apply_expert_lora(model, build_lora_config(get_family(model.config), r=4, targets=list(targets)))
    return peft_model, tokenizer


def _args(tmp_path, **overrides) -> FederatedMoEConfig:
    return local_round_args(tmp_path / "local", **overrides)


def _forbid_expert(peft_model: PeftModel, layer: int, expert: int) -> None:
    """Reroute layer `layer`'s tokens away from `expert` (registered before the trainer's counting hooks)."""
    router = peft_model.base_model.model.model.layers[layer].mlp.gate

    def hook(module, inputs, output):
        logits, scores, index = output
        return logits, scores, torch.where(index == expert, (index + 1) % expert, index)

    router.register_forward_hook(hook)


def test_local_round_moves_routed_experts_only(tmp_path):
    peft_model, tokenizer = _model()
    _forbid_expert(peft_model, layer=0, expert=NEVER_ROUTED)
    layout = expert_layout_from_peft_model(peft_model)
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    start = adapter_state(peft_model)
    trainer = FederatedMoETrainer(
        peft_model,
        args=_args(tmp_path),
        train_dataset=synthetic_domains(64),
        processing_class=tokenizer,
        client_id="c0",
        start_state=start,
    )
    update = trainer.train_round()

    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), f"frozen base weight {name} changed"
    counts = update.expert_counts
    assert counts[0, NEVER_ROUTED] == 0 and (counts[1] > 0).all()
    for pair in layout.by_kind("expert"):
        b_start, a_start = pair.expert_factors(start)
        b_end, a_end = pair.expert_factors(update.state)
        for e in range(pair.num_experts):
            moved = not (torch.equal(a_start[e], a_end[e]) and torch.equal(b_start[e], b_end[e]))
            assert moved == bool(counts[pair.layer, e] > 0), (pair.module, e, counts[pair.layer, e])
    assert update.client_id == "c0" and update.num_examples == 64 and update.train_loss > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_expert_counts_sum_to_tokens_times_top_k(tmp_path, checkpointing):
    peft_model, tokenizer = _model()
    top_k = peft_model.get_base_model().config.num_experts_per_tok
    args = _args(tmp_path, activation_checkpointing=checkpointing, max_steps=3)
    trainer = FederatedMoETrainer(
        peft_model, args=args, train_dataset=synthetic_domains(48), processing_class=tokenizer
    )
    seen_tokens = []
    original = trainer.training_step

    def counting_step(model, inputs, *rest, **kwargs):
        seen_tokens.append(int(inputs["attention_mask"].sum()))
        return original(model, inputs, *rest, **kwargs)

    trainer.training_step = counting_step
    update = trainer.train_round()
    tokens = sum(seen_tokens)
    assert tokens > 0
    assert update.expert_counts.sum(dim=1).tolist() == [tokens * top_k] * update.expert_counts.shape[0]


def test_proximal_term_is_distance_to_round_start(tmp_path):
    peft_model, tokenizer = _model()
    trainer = FederatedMoETrainer(
        peft_model,
        args=_args(tmp_path, proximal_mu=0.5),
        train_dataset=synthetic_domains(16),
        processing_class=tokenizer,
    )
    assert float(trainer.proximal_term(peft_model).detach()) == 0.0
    with torch.no_grad():
        param = next(p for n, p in peft_model.named_parameters() if p.requires_grad)
        param.add_(1.0)
    assert float(trainer.proximal_term(peft_model).detach()) == pytest.approx(param.numel(), rel=1e-5)


def test_fedprox_keeps_local_round_closer_to_start(tmp_path):
    distances = {}
    for mu in (0.0, 50.0):
        peft_model, tokenizer = _model()
        start = adapter_state(peft_model)
        trainer = FederatedMoETrainer(
            peft_model,
            args=_args(tmp_path, proximal_mu=mu, max_steps=6),
            train_dataset=synthetic_domains(64),
            processing_class=tokenizer,
            start_state=start,
        )
        update = trainer.train_round()
        distances[mu] = sum(float((update.state[k] - start[k]).pow(2).sum()) for k in start)
    assert distances[50.0] < distances[0.0]


def test_retained_part_is_taken_out_of_the_report(tmp_path):
    peft_model, tokenizer = _model()
    start = adapter_state(peft_model)
    retained = {k: torch.full_like(v, 0.25) for k, v in start.items()}
    started_from = {k: start[k] + retained[k] for k in start}
    trainer = FederatedMoETrainer(
        peft_model,
        args=_args(tmp_path, max_steps=0, num_train_epochs=0),
        train_dataset=synthetic_domains(16),
        processing_class=tokenizer,
        start_state=started_from,
        retained=retained,
    )
    update = trainer.train_round()
    for key in start:
        torch.testing.assert_close(update.state[key], start[key])


@pytest.mark.parametrize(
    "rows",
    [
        {"prompt": ["add 1 2 ="] * 8, "completion": [" 3"] * 8},
        {"messages": [[{"role": "user", "content": "reverse ab"}, {"role": "assistant", "content": "ba"}]] * 8},
        {"text": ["upper ab = AB"] * 8},
    ],
    ids=["prompt_completion", "messages", "text"],
)
def test_usual_dataset_formats_train(tmp_path, rows):
    peft_model, tokenizer = _model()
    trainer = FederatedMoETrainer(
        peft_model,
        args=_args(tmp_path, max_steps=2),
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
    )
    update = trainer.train_round()
    assert update.expert_counts.sum() > 0 and update.train_loss > 0


def test_dense_model_is_refused(tmp_path, dense_config):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from hf_fcmoe.adapters.peft_quirks import muted_checkpointing_probe

    with muted_checkpointing_probe():  # PEFT's own probe of a deprecated property, as in the library
        dense = get_peft_model(LlamaForCausalLM(dense_config), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'llama' is not a supported Mixture-of-Experts"):
        FederatedMoETrainer(dense, args=_args(tmp_path), train_dataset=synthetic_domains(8))
