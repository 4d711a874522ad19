"""Rows -> the dataset formats TRL's SFTTrainer trains on.

Exactly one format's columns come out ("text", "prompt"+"completion", or "messages"): with several
present TRL's format detection is ambiguous. The label column is kept (as the domain for partition
reports, or as the gold class index for label-scoring accuracy); SFTTrainer drops it as unused.

Classification is trained as instruction -> label word: the prompt lists the label words and ends
with "Label:", the completion is `LABEL_PREFIX + word`. The label words stay in the dataset as the
names of a `ClassLabel` feature, so evaluation scores the same words the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import ClassLabel, Dataset, Features, LargeList, List, Value
from datasets import Sequence as HFSequence

TASKS = ("lm", "classification")
LABEL_PREFIX = " "  # completions start with a space: BPE tokenizers merge it into the word's first token
DEFAULT_TEMPLATE = "Classify the text into one of: {labels}.\nText: {text}\nLabel:"


def _is_messages(dataset: Dataset, column: str) -> bool:
    feature = dataset.features[column]
    if isinstance(feature, (List, LargeList, HFSequence)):
        inner = feature.feature
    else:
        inner = feature[0] if isinstance(feature, list) and feature else None
    return isinstance(inner, dict) and {"role", "content"} <= set(inner)


def _missing(dataset: Dataset, column: str, why: str) -> ValueError:
    return ValueError(f"no column {column!r} ({why}); the dataset's columns are {dataset.column_names}")


def detect_format(dataset: Dataset, text_column: str = "text", completion_column: str | None = None) -> str:
    """'messages', 'prompt_completion' or 'text': what `text_column` (and a completion column) hold."""
    if text_column not in dataset.column_names:
        raise _missing(dataset, text_column, "text_column")
    if _is_messages(dataset, text_column):
        return "messages"
    if completion_column is None and text_column == "prompt":
        completion_column = "completion"
    if completion_column is not None:
        if completion_column not in dataset.column_names:
            raise _missing(dataset, completion_column, f"completion for prompt column {text_column!r}")
        return "prompt_completion"
    return "text"


def class_names(dataset: Dataset, label_column: str, label_names: Sequence[str] | None = None) -> list[str]:
    """Label words: given ones, else a ClassLabel's names, else the sorted distinct values as strings."""
    if label_names:
        return [str(name) for name in label_names]
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = {str(value) for value in dataset[label_column]}
    return sorted(values, key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))  # 2 before 10


def _label_index(value: object, names: list[str], label_column: str) -> int:
    """Map a row's label (a word, or an integer index into `names`) to its class index."""
    text = str(value)
    if text in names:
        return names.index(text)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise ValueError(f"label {value!r} in column {label_column!r} is not one of the label names {names}")


def classification_format(
    dataset: Dataset,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Dataset:
    """text + label -> prompt (instruction) + completion (label word) + label (ClassLabel index)."""
    for column, role in ((text_column, "text_column"), (label_column, "label column of a classification task")):
        if column not in dataset.column_names:
            raise _missing(dataset, column, role)
    if "{text}" not in template:
        raise ValueError(f"classification template must contain '{{text}}', got {template!r}")
    names = class_names(dataset, label_column, label_names)
    listed = ", ".join(names)

    def convert(row: dict) -> dict:
        index = _label_index(row[label_column], names, label_column)
        prompt = template.format(text=row[text_column], labels=listed)
        return {"prompt": prompt, "completion": LABEL_PREFIX + names[index], "label": index}

    features = Features({"prompt": Value("string"), "completion": Value("string"), "label": ClassLabel(names=names)})
    converted = dataset.map(convert, remove_columns=dataset.column_names, features=features)
    return converted.select_columns(list(features))


def to_training_format(
    dataset: Dataset,
    task: str = "lm",
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    completion_column: str | None = None,
) -> Dataset:
    """Columns SFTTrainer accepts ("text" | "prompt"+"completion" | "messages"), plus the label column if present.

    task="lm": `text_column` holds plain text, chat messages, or (with `completion_column`, implied for
    "prompt") a prompt. task="classification": text + label -> instruction prompt + label-word completion.
    """
    if task == "classification":
        return classification_format(dataset, text_column, label_column, label_names, template)
    if task != "lm":
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    kind = detect_format(dataset, text_column, completion_column)
    sources = {
        "text": {"text": text_column},
        "messages": {"messages": text_column},
        "prompt_completion": {"prompt": text_column, "completion": completion_column or "completion"},
    }[kind]
    if label_column in dataset.column_names and label_column not in sources.values():
        sources["label"] = label_column
    dataset = dataset.select_columns(list(dict.fromkeys(sources.values())))
    return dataset.rename_columns({old: new for new, old in sources.items() if old != new})


def _fill_template(template: str, labels: str) -> tuple[str, str]:
    """The template's text before and after ``{text}`` (with the label list filled in)."""
    marker = "\x00TEXT\x00"
    head, _, tail = template.format(text=marker, labels=labels).partition(marker)
    return head, tail


def fit_prompts_to_length(
    dataset: Dataset, tokenizer, max_length: int | None, template: str = DEFAULT_TEMPLATE
) -> tuple[Dataset, int]:
    """Shorten the input text of classification prompts that would not fit `max_length` with their label.

    SFTTrainer truncates prompt + completion from the end, so an over-long prompt loses its label word (the
    completion): the row trains on nothing while the eval loss still moves. Here the text inside the prompt is
    cut (by tokens, keeping the instruction and the trailing "Label:"), never the label. Returns the dataset and
    how many rows were shortened.
    """
    if max_length is None or "prompt" not in dataset.column_names or "label" not in dataset.column_names:
        return dataset, 0
    feature = dataset.features["label"]
    if not isinstance(feature, ClassLabel):
        return dataset, 0
    head, tail = _fill_template(template, ", ".join(feature.names))
    eos = tokenizer.eos_token or ""

    def length(prompt: str, completion: str) -> int:
        return len(tokenizer(prompt + completion + eos)["input_ids"])

    shortened = 0

    def fit(row: dict) -> dict:
        nonlocal shortened
        prompt, completion = row["prompt"], row["completion"]
        excess = length(prompt, completion) - max_length
        if excess <= 0 or not (prompt.startswith(head) and prompt.endswith(tail)):
            return row
        text_ids = tokenizer(prompt[len(head) : len(prompt) - len(tail)], add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - excess
        while keep > 0:
            candidate = head + tokenizer.decode(text_ids[:keep]) + tail
            excess = length(candidate, completion) - max_length
            if excess <= 0:
                shortened += 1
                return {**row, "prompt": candidate}
            keep -= excess
        shortened += 1
        return {**row, "prompt": head + tail}  # the instruction alone: the label still fits or nothing could

    rows = [fit(row) for row in dataset]
    if not shortened:
        return dataset, 0
    return Dataset.from_list(rows, features=dataset.features), shortened
