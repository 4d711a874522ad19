"""to_training_format: one TRL format per dataset, classification as instruction -> label word."""

from __future__ import annotations

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from hf_fcmoe.data.formatting import LABEL_PREFIX, detect_format, to_training_format

MESSAGES = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 2


def test_plain_text_keeps_label_and_drops_the_rest():
    data = Dataset.from_dict({"body": ["a b", "c d"], "label": ["x", "y"], "noise": [1, 2]})
    out = to_training_format(data, text_column="body")
    assert out.column_names == ["text", "label"] and out["text"] == ["a b", "c d"]


def test_prompt_completion_is_implied_by_a_prompt_column():
    data = Dataset.from_dict({"prompt": ["2+2="], "completion": ["4"], "text": ["2+2=4"]})
    assert detect_format(data, "prompt") == "prompt_completion"
    out = to_training_format(data, text_column="prompt")
    assert out.column_names == ["prompt", "completion"]


def test_chat_messages_are_detected_from_the_column_content():
    data = Dataset.from_dict({"turns": MESSAGES, "text": ["hi hello"] * 2, "label": ["greet"] * 2})
    out = to_training_format(data, text_column="turns")
    assert out.column_names == ["messages", "label"] and out[0]["messages"][1]["role"] == "assistant"


def test_classification_with_integer_labels_and_given_names():
    data = Dataset.from_dict({"text": ["goal!", "rates up"], "label": [1, 2]})
    names = ["World", "Sports", "Business", "Sci/Tech"]
    out = to_training_format(data, "classification", label_names=names)
    assert out.column_names == ["prompt", "completion", "label"]
    assert out["completion"] == [LABEL_PREFIX + "Sports", LABEL_PREFIX + "Business"]
    assert out.features["label"].names == names and out["label"] == [1, 2]
    assert out[0]["prompt"].endswith("Label:") and "goal!" in out[0]["prompt"] and "Sci/Tech" in out[0]["prompt"]


def test_classification_takes_words_from_classlabel_or_string_values():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    data = Dataset.from_dict({"text": ["bad", "good"], "label": [0, 1]}, features=features)
    assert to_training_format(data, "classification").features["label"].names == ["neg", "pos"]
    words = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["ham", "spam", "ham"]})
    out = to_training_format(words, "classification", template="Mail: {text}\nLabel:")
    assert out.features["label"].names == ["ham", "spam"] and out["label"] == [0, 1, 0]
    assert out[0]["prompt"] == "Mail: a\nLabel:"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"text_column": "body"}, "'body'"),
        ({"task": "classification", "label_column": "topic"}, "'topic'"),
        ({"task": "classification", "label_names": ["a"]}, "label 'b'"),
        ({"task": "classification", "template": "no slot"}, "{text}"),
        ({"text_column": "text", "completion_column": "answer"}, "'answer'"),
        ({"task": "regression"}, "regression"),
    ],
)
def test_bad_columns_and_options_are_named(kwargs, match):
    data = Dataset.from_dict({"text": ["x", "y"], "label": ["a", "b"]})
    with pytest.raises(ValueError, match=match):
        to_training_format(data, **kwargs)
