"""Routing specialisation math and its measurement on a tiny model."""

from __future__ import annotations

import pytest
import torch

from hf_fcmoe.metrics.routing import js_divergence, normalized_entropy, specialisation_summary, usage_distribution


def test_entropy_is_one_for_uniform_and_zero_for_one_expert():
    dist = usage_distribution(torch.tensor([[5, 5, 5, 5], [0, 9, 0, 0]]))
    assert normalized_entropy(dist).tolist() == pytest.approx([1.0, 0.0])


def test_js_divergence_bounds():
    p = usage_distribution(torch.tensor([[1, 1, 0, 0]]))
    q = usage_distribution(torch.tensor([[0, 0, 3, 3]]))
    assert float(js_divergence(p, p)) == pytest.approx(0.0)
    assert float(js_divergence(p, q)) == pytest.approx(1.0)  # disjoint experts: 1 bit
    assert float(js_divergence(p, q)) == pytest.approx(float(js_divergence(q, p)))


def test_summary_separates_specialised_from_shared_routing():
    same = {"a": torch.tensor([[4, 4, 0, 0]]), "b": torch.tensor([[8, 8, 0, 0]])}
    split = {"a": torch.tensor([[4, 4, 0, 0]]), "b": torch.tensor([[0, 0, 8, 8]])}
    assert specialisation_summary(same)["js_mean"] == pytest.approx(0.0)
    summary = specialisation_summary(split)
    assert summary["js_mean"] == pytest.approx(1.0) and summary["js_max"] == pytest.approx(1.0)
    assert summary["entropy"]["a"] == pytest.approx(0.5)


def test_dense_layers_do_not_count_as_routing_layers():
    """A partly upcycled model has dense layers with no router: their zero rows are left out of the means."""
    with_dense = {"a": torch.tensor([[0, 0, 0, 0], [4, 4, 0, 0]]), "b": torch.tensor([[0, 0, 0, 0], [0, 0, 8, 8]])}
    summary = specialisation_summary(with_dense)
    assert summary["js_mean"] == pytest.approx(1.0) and summary["entropy"]["a"] == pytest.approx(0.5)
    assert summary["js_per_layer"] == [pytest.approx(1.0)]


def test_probe_counts_every_real_token_top_k_times_in_eval_mode():
    from hf_fcmoe.metrics.routing_probe import expert_usage, routing_specialisation
    from hf_fcmoe.models.families import build_tiny_moe

    model, tokenizer = build_tiny_moe("mixtral")
    model.train()
    texts = ["abc", "a much longer text with padding after the short one"]
    counts = expert_usage(model, tokenizer, texts, batch_size=2)
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    top_k = model.config.num_experts_per_tok
    assert counts.sum(dim=1).tolist() == [tokens * top_k] * model.config.num_hidden_layers
    assert model.training  # the probe restores the mode it found
    summary = routing_specialisation(model, tokenizer, {"x": ["hello world"], "y": ["12345 + 678"]})
    assert 0.0 <= summary["js_mean"] <= 1.0 and set(summary["entropy"]) == {"x", "y"}
