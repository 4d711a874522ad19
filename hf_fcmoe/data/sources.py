"""Where rows come from: bundled sources, local files or folders, or a Hub dataset id.

A Hub id is only tried after a short reachability probe: without network `load_dataset` retries for
~25 s before failing, and the message should say how to use local files instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from hf_fcmoe.data.corpora import BUNDLED_CORPORA
from hf_fcmoe.data.disagreement import synthetic_disagreement
from hf_fcmoe.data.synthetic import synthetic_domains

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_PROBE_TIMEOUT_S = float(os.environ.get("HF_FCMOE_HUB_TIMEOUT", "3"))
_TRUE = {"1", "true", "yes", "on"}

BUNDLED: dict[str, Callable[[str | None, int | None, int], Dataset]] = {
    # dataset_config of synthetic_domains: a comma-separated subset of its domains ("sort,count")
    "synthetic_domains": lambda config, num_examples, seed: synthetic_domains(
        num_examples or 2048, domains=config.split(",") if config else None, seed=seed
    ),
    # dataset_config of synthetic_disagreement: "rules;shared" ("sort,reverse,upper,vowels;multiply,count")
    "synthetic_disagreement": lambda config, num_examples, seed: synthetic_disagreement(
        num_examples or 2048, config=config, seed=seed
    ),
    **{name: (lambda config, num_examples, seed, make=make: make(config)) for name, make in BUNDLED_CORPORA.items()},
}


def _offline_flag() -> bool:
    return any(os.environ.get(var, "").lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the Hub endpoint (HF_ENDPOINT) opens within `timeout` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unreachable_message(name: str, reason: str) -> str:
    return (
        f"cannot load dataset {name!r} from the Hub: {reason}. Without network, download it elsewhere and set "
        "dataset_name to a local .json/.jsonl/.csv/.parquet file or a folder of them (or a `save_to_disk` "
        f"folder), or use a bundled source ({', '.join(sorted(BUNDLED))}); with a cached copy, set HF_HUB_OFFLINE=1"
    )


def _load_hub(name: str, config: str | None, split: str) -> Dataset:
    if not _offline_flag() and not hub_reachable():
        raise ConnectionError(_unreachable_message(name, f"no connection within {HUB_PROBE_TIMEOUT_S:g} s"))
    try:
        return load_dataset(name, config, split=split)
    except (ConnectionError, OSError) as error:
        reason = "offline mode and no cached copy" if _offline_flag() else type(error).__name__
        raise ConnectionError(_unreachable_message(name, reason)) from error


def _load_local(path: Path, split: str) -> Dataset:
    if path.is_file():
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"saved dataset {str(path)!r} has no split {split!r}; splits: {list(loaded)}")
            return loaded[split]
        return loaded
    return load_dataset(str(path), split=split)


def load_source(
    name: str, config: str | None = None, split: str = "train", num_examples: int | None = None, seed: int = 0
) -> Dataset:
    """Load `name`: a bundled source, a local file/folder, or a Hub dataset id; optionally subsample (seeded)."""
    path = Path(name)
    if name in BUNDLED:
        dataset = BUNDLED[name](config, num_examples, seed)
    elif path.suffix in LOCAL_FORMATS or path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"local dataset file {name!r} does not exist")
        dataset = _load_local(path, split)
    else:
        dataset = _load_hub(name, config, split)
    if num_examples is not None and num_examples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(num_examples))
    return dataset


def require_columns(dataset: Dataset, columns: list[str], name: str, why: str = "") -> None:
    """Fail early with the missing column's name and what the dataset does have."""
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        purpose = f" ({why})" if why else ""
        raise ValueError(
            f"dataset {name!r} has no column {missing[0]!r}{purpose}; its columns are {dataset.column_names}"
        )
