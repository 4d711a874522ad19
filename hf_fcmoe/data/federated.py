"""From a dataset spec to per-client train/eval splits plus a global eval set.

`load_federated_data` is the one entry point the engines use: load the source, check columns,
partition across clients (seeded), split each client into train/eval, and build the global eval
set as the union of the client eval splits.

Rows are put into a TRL training format first (`to_training_format`: text, prompt/completion,
messages, or classification as instruction -> label word), so every client split is ready for
SFTTrainer and a classification eval split carries its gold label index and label words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasets import ClassLabel, Dataset, concatenate_datasets

from hf_fcmoe.data.formatting import DEFAULT_TEMPLATE, to_training_format
from hf_fcmoe.data.partition import NEEDS_LABELS, partition_indices
from hf_fcmoe.data.sources import load_source, require_columns

TEXT_COLUMNS = ("text", "prompt", "messages")


@dataclass
class DataSpec:
    """What to load and how to split it across clients (mirrors the data fields of the recipe)."""

    dataset_name: str = "synthetic_domains"
    dataset_config: str | None = None
    dataset_split: str = "train"
    num_examples: int | None = None
    label_column: str = "label"
    num_clients: int = 4
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    min_partition_size: int = 8
    eval_fraction: float = 0.2
    seed: int = 0
    task: str = "lm"  # "lm" or "classification" (text + label -> instruction -> label word)
    text_column: str | None = None  # None: the first of TEXT_COLUMNS present
    partition_column: str | None = None  # column the partitioner skews on; None: label_column
    shards_per_client: int = 2  # labels per client of the "shards" (pathological) partition
    class_names: list[str] | None = None  # label words of a classification task; None: from the data
    prompt_template: str | None = None  # classification instruction with {text} (and {labels}); None: default


@dataclass
class FederatedData:
    """Per-client splits (formatted, untokenized rows) and the global eval union."""

    train: dict[str, Dataset]
    eval: dict[str, Dataset]
    global_eval: Dataset
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    label_names: list[str] | None = None  # label words of a classification task, in class-index order

    @property
    def client_ids(self) -> list[str]:
        return list(self.train)


def client_id(index: int) -> str:
    return f"client_{index:03d}"


def resolve_text_column(dataset: Dataset, name: str, text_column: str | None) -> str:
    """The given text column (which must exist), else the first usable one; errors name what exists."""
    if text_column is not None:
        require_columns(dataset, [text_column], name, "text_column")
        return text_column
    for column in TEXT_COLUMNS:
        if column in dataset.column_names:
            return column
    raise ValueError(
        f"dataset {name!r} has no usable text column: expected one of {list(TEXT_COLUMNS)} "
        f"(plain text, prompt/completion or chat messages) or set text_column; found {dataset.column_names}"
    )


def _key_values(dataset: Dataset, spec: DataSpec) -> list | None:
    """Values the partitioner skews on: partition_column, else label_column (None when absent and not needed)."""
    column = spec.partition_column or spec.label_column
    if spec.partition_column is not None or spec.partition in NEEDS_LABELS:
        require_columns(dataset, [column], spec.dataset_name, f"needed by the {spec.partition!r} partition")
    return dataset[column] if column in dataset.column_names else None


def _count_labels(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values, return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts)}


def load_federated_data(spec: DataSpec) -> FederatedData:
    """Load `spec.dataset_name`, format it, partition it over `spec.num_clients` clients and split train/eval."""
    raw = load_source(spec.dataset_name, spec.dataset_config, spec.dataset_split, spec.num_examples, spec.seed)
    text_column = resolve_text_column(raw, spec.dataset_name, spec.text_column)
    keys = _key_values(raw, spec)
    dataset = to_training_format(
        raw, spec.task, text_column, spec.label_column, spec.class_names, spec.prompt_template or DEFAULT_TEMPLATE
    )
    parts = partition_indices(
        num_examples=len(dataset),
        num_clients=spec.num_clients,
        method=spec.partition,
        labels=keys,
        alpha=spec.dirichlet_alpha,
        min_size=spec.min_partition_size,
        seed=spec.seed,
        shards_per_client=spec.shards_per_client,
    )
    label_feature = dataset.features.get("label")
    label_names = label_feature.names if isinstance(label_feature, ClassLabel) else None
    if "label" in dataset.column_names:
        shown = np.asarray([label_names[i] if label_names else str(i) for i in dataset["label"]])
    else:
        shown = None if keys is None else np.asarray([str(k) for k in keys])
    rng = np.random.default_rng(spec.seed)
    train, evals, label_counts = {}, {}, {}
    for index, part in enumerate(parts):
        cid = client_id(index)
        part = rng.permutation(np.asarray(part))
        num_eval = max(1, int(round(len(part) * spec.eval_fraction)))
        if num_eval >= len(part):
            raise ValueError(
                f"{cid} has {len(part)} examples: eval_fraction={spec.eval_fraction} leaves no training rows; "
                "raise min_partition_size or lower eval_fraction"
            )
        evals[cid] = dataset.select(sorted(part[:num_eval].tolist()))
        train[cid] = dataset.select(sorted(part[num_eval:].tolist()))
        if shown is not None:
            label_counts[cid] = _count_labels(shown[part])
    global_eval = concatenate_datasets(list(evals.values()))
    return FederatedData(train, evals, global_eval, label_counts, label_names)
