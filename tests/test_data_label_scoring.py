"""Label scoring on a hand-made model whose next-token distribution we set, and the shipped accuracy metric."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_fcmoe.data.formatting import to_training_format
from hf_fcmoe.metrics import load_metric
from hf_fcmoe.metrics.label_scoring import evaluate_label_scoring, label_scoring_accuracy, score_labels
from hf_fcmoe.models.tokenization import build_byte_tokenizer


class BigramLM(nn.Module):
    """logits[t] = table[input_ids[t]]: the next token depends only on the current one."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture
def setup():
    tokenizer = build_byte_tokenizer()
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "abxy"}
    table = torch.zeros(len(tokenizer), len(tokenizer))
    table[ids["a"], ids["x"]] = 3.0  # after 'a', 'x' is likely
    table[ids["b"], ids["y"]] = 3.0  # after 'b', 'y' is likely
    table[ids["x"], ids["y"]] = 5.0  # 'x' is followed by 'y'
    return BigramLM(table), tokenizer, ids


def test_scores_are_the_hand_computed_sums(setup):
    model, tokenizer, ids = setup
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    scores = score_labels(model, tokenizer, ["ca", "cb"], ["x", "y", "xy"], batch_size=2, prefix="", append_eos=False)
    expected = torch.tensor(
        [
            [logp[ids["a"], ids["x"]], logp[ids["a"], ids["y"]], logp[ids["a"], ids["x"]] + logp[ids["x"], ids["y"]]],
            [logp[ids["b"], ids["x"]], logp[ids["b"], ids["y"]], logp[ids["b"], ids["x"]] + logp[ids["x"], ids["y"]]],
        ]
    )
    torch.testing.assert_close(scores, expected)
    rebatched = score_labels(model, tokenizer, ["ca", "cb"], ["x", "y", "xy"], 5, prefix="", append_eos=False)
    torch.testing.assert_close(rebatched, scores)
    with_eos = score_labels(model, tokenizer, ["ca", "cb"], ["x", "y", "xy"], 3, prefix="")
    eos = tokenizer.eos_token_id
    last = [ids["x"], ids["y"], ids["y"]]
    torch.testing.assert_close(with_eos - scores, torch.stack([logp[last, eos]] * 2))
    assert scores.argmax(dim=1).tolist() == [0, 1]


def test_label_scoring_accuracy_hand_made():
    scores = torch.tensor([[0.0, -1.0], [-2.0, -0.5], [-1.0, -1.0], [-3.0, -0.1]])
    assert label_scoring_accuracy(scores, torch.tensor([0, 1, 1, 0])) == 0.5  # row 2 ties -> first label
    with pytest.raises(ValueError, match="gold"):
        label_scoring_accuracy(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        label_scoring_accuracy(scores, torch.tensor([0, 1, 2, 0]))


def test_shipped_accuracy_metric_loads_offline():
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="'f1'"):
        load_metric("f1")


def test_evaluate_on_a_classification_split(setup):
    model, tokenizer, ids = setup
    from datasets import Dataset

    space = tokenizer(" ")["input_ids"][0]
    with torch.no_grad():
        model.table[space, ids["y"]] = 2.0  # completions are " x" / " y": after the space, 'y' wins
    data = Dataset.from_dict({"text": ["a", "b", "a"], "label": ["x", "y", "y"]})
    split = to_training_format(data, "classification", template="{text}")
    assert split["completion"] == [" x", " y", " y"]
    assert evaluate_label_scoring(model, tokenizer, split) == pytest.approx(2 / 3)


def test_tiny_moe_scores_without_router_loss():
    from hf_fcmoe.models.families import build_tiny_moe

    model, tokenizer = build_tiny_moe("mixtral", seed=0)
    model.config.output_router_logits = True
    scores = score_labels(model, tokenizer, ["Text: hello\nLabel:", "Text: goal\nLabel:"], ["World", "Sports"], 4)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all() and (scores < 0).all()
    single = score_labels(model, tokenizer, ["Text: goal\nLabel:"], ["World", "Sports"], 1)
    torch.testing.assert_close(single, scores[1:], atol=1e-4, rtol=1e-4)
