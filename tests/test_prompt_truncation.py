"""Classification prompts longer than max_length lose input text, never their label (and the user is told once)."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset

from hf_fcmoe.data.formatting import DEFAULT_TEMPLATE, classification_format, fit_prompts_to_length
from hf_fcmoe.models.tokenization import build_byte_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "ag_news_tiny.jsonl"
NAMES = ["world", "sports", "business"]
AG_NEWS = ["World", "Sports", "Business", "Sci/Tech"]


def _long_rows() -> Dataset:
    texts = ["short one", "x" * 300, "a fairly long news text " * 10, "ok"]
    return classification_format(Dataset.from_dict({"text": texts, "label": [0, 1, 2, 1]}), label_names=NAMES)


def test_long_prompts_keep_instruction_and_label():
    tokenizer = build_byte_tokenizer()
    rows = _long_rows()
    fitted, shortened = fit_prompts_to_length(rows, tokenizer, max_length=120, template=DEFAULT_TEMPLATE)
    assert shortened == 2
    for before, after in zip(rows, fitted):
        assert after["completion"] == before["completion"] and after["label"] == before["label"]
        total = tokenizer(after["prompt"] + after["completion"] + tokenizer.eos_token)["input_ids"]
        assert len(total) <= 120
        assert after["prompt"].startswith("Classify the text into one of: world, sports, business.\nText: ")
        assert after["prompt"].endswith("\nLabel:")
    assert fitted[0]["prompt"] == rows[0]["prompt"]  # what fits is untouched
    assert fit_prompts_to_length(rows, tokenizer, max_length=None) == (rows, 0)


def test_a_classification_run_trains_on_every_label_and_says_so_once(tiny_run_config, caplog):
    from hf_fcmoe.federation.simulation import FederatedSimulation

    config = tiny_run_config(
        task="classification",
        dataset_name=str(FIXTURE),
        num_examples=None,
        num_clients=2,
        num_rounds=1,
        max_steps=1,
        max_length=100,
        eval_fraction=0.25,
        partition="iid",
        class_names=AG_NEWS,
    )
    with caplog.at_level(logging.WARNING, logger="hf_fcmoe"):
        simulation = FederatedSimulation(config, progress=False)
        result = simulation.run()
    notes = [r for r in caplog.records if "classification prompts were longer than max_length=100" in r.getMessage()]
    assert len(notes) == 1
    assert result.metrics[-1]["truncated_prompts"] > 0
    tokenizer = simulation.tokenizer
    expected = {f" {name}{tokenizer.eos_token}" for name in AG_NEWS}
    for splits in simulation.splits.values():
        for row in splits.train:
            label_tokens = [t for t in row["labels"] if t != -100]  # the tokens the loss is computed on
            assert tokenizer.decode(label_tokens) in expected, tokenizer.decode(row["input_ids"])
