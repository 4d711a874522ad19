"""Federated evaluation: token-level eval loss of an adapter on a client's tokenized eval split.

The loss is computed here from logits (sum of next-token NLL over label tokens / their count), not
taken from the model output: MoE models add `router_aux_loss_coef * aux_loss` to `loss` when
router logits are returned, which must not leak into eval comparisons. Summing over tokens makes
the number independent of the batch size, so a reloaded adapter reproduces it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@torch.no_grad()
def nll_sum_and_count(
    model: nn.Module, dataset: Dataset, collator: Callable, batch_size: int = 16
) -> tuple[float, int]:
    """Sum of next-token NLL over tokens whose label is not -100, and how many there were."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    columns = [c for c in dataset.column_names if c in ("input_ids", "completion_mask", "assistant_masks", "labels")]
    rows = dataset.select_columns(columns)
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
        logits = model(**inputs, output_router_logits=False).logits.float()
        labels = batch["labels"].to(device)[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((labels != -100).sum())
    model.train(was_training)
    return total, count


def eval_loss(model: nn.Module, dataset: Dataset, collator: Callable, batch_size: int = 16) -> float:
    """Mean next-token NLL per label token (natural log); NaN for an empty split."""
    total, count = nll_sum_and_count(model, dataset, collator, batch_size)
    return total / count if count else math.nan


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf
