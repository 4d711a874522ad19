"""From a dataset spec to per-client train/eval splits plus a global eval set.

`load_federated_data` is the one entry point the engines use: load the source, check columns,
partition across clients (seeded), split each client into train/eval, and build the global eval
set as the union of the client eval splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset, concatenate_datasets

from hf_fcmoe.data.partition import partition_indices
from hf_fcmoe.data.sources import load_source

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


@dataclass
class FederatedData:
    """Per-client splits (raw, untokenized rows) and the global eval union."""

    train: dict[str, Dataset]
    eval: dict[str, Dataset]
    global_eval: Dataset
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def client_ids(self) -> list[str]:
        return list(self.train)


def client_id(index: int) -> str:
    return f"client_{index:03d}"


def check_text_columns(dataset: Dataset, name: str) -> None:
    """Fail early, naming the dataset and its columns, when no usable text column exists."""
    if not any(column in dataset.column_names for column in TEXT_COLUMNS):
        raise ValueError(
            f"dataset {name!r} has no usable text column: expected one of {list(TEXT_COLUMNS)} "
            f"(plain text, prompt/completion or chat messages), found {dataset.column_names}"
        )


def load_federated_data(spec: DataSpec) -> FederatedData:
    """Load `spec.dataset_name`, partition it over `spec.num_clients` clients and split train/eval."""
    dataset = load_source(spec.dataset_name, spec.dataset_config, spec.dataset_split, spec.num_examples, spec.seed)
    check_text_columns(dataset, spec.dataset_name)
    labels = dataset[spec.label_column] if spec.label_column in dataset.column_names else None
    parts = partition_indices(
        num_examples=len(dataset),
        num_clients=spec.num_clients,
        method=spec.partition,
        labels=labels,
        alpha=spec.dirichlet_alpha,
        min_size=spec.min_partition_size,
        seed=spec.seed,
    )
    rng = np.random.default_rng(spec.seed)
    train, evals, label_counts = {}, {}, {}
    for index, part in enumerate(parts):
        cid = client_id(index)
        part = rng.permutation(np.asarray(part))
        num_eval = max(1, int(round(len(part) * spec.eval_fraction)))
        evals[cid] = dataset.select(sorted(part[:num_eval].tolist()))
        train[cid] = dataset.select(sorted(part[num_eval:].tolist()))
        if labels is not None:
            values, counts = np.unique(np.asarray(labels, dtype=object)[part].astype(str), return_counts=True)
            label_counts[cid] = {str(v): int(c) for v, c in zip(values, counts)}
    global_eval = concatenate_datasets(list(evals.values()))
    return FederatedData(train=train, eval=evals, global_eval=global_eval, label_counts=label_counts)
