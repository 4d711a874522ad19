"""Measure how a model routes each domain's text: expert-usage counts per domain, then the summary.

This is the layer that touches models and tokenizers; the math lives in `hf_fcmoe.metrics.routing`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from hf_fcmoe.metrics.routing import specialisation_summary
from hf_fcmoe.training.callbacks import ExpertTokenCounter


def texts_by_domain(texts: list, domains: list, per_domain: int) -> dict[str, list[str]]:
    """The first `per_domain` string texts of each domain (domains as strings), in order of appearance."""
    grouped: dict[str, list[str]] = {}
    for text, domain in zip(texts, domains):
        if isinstance(text, str) and len(grouped.setdefault(str(domain), [])) < per_domain:
            grouped[str(domain)].append(text)
    return grouped


@torch.no_grad()
def expert_usage(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 128, batch_size: int = 16
) -> torch.Tensor:
    """Routed-token counts (num_layers, num_experts) of `texts` at inference (padding excluded)."""
    counter = ExpertTokenCounter(model, training_only=False)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return counter.counts.clone()
    finally:
        counter.remove()
        model.train(was_training)


def routing_specialisation(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts_by_domain: dict[str, list[str]], max_length: int = 128
) -> dict:
    """`specialisation_summary` of the model's routing on each domain's texts."""
    counts = {name: expert_usage(model, tokenizer, texts, max_length) for name, texts in texts_by_domain.items()}
    return specialisation_summary(counts)
