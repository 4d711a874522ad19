"""Partitioners: seeded, every example exactly once, skew follows alpha, bad inputs named."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fcmoe.data.partition import PARTITIONERS, partition_indices
from hf_fcmoe.data.partition_report import describe_partition, mean_max_label_share, plot_partition

LABELS = [f"l{i % 5}" for i in range(400)]  # 5 balanced labels


def _parts(method: str, seed: int = 0, num_clients: int = 5, **kwargs) -> list[list[int]]:
    kwargs = {"labels": LABELS, "alpha": 0.5, "min_size": 4, **kwargs}
    return partition_indices(len(kwargs["labels"]), num_clients, method, seed=seed, **kwargs)


def _counts(parts: list[list[int]], labels=LABELS) -> dict[str, dict[str, int]]:
    return {
        f"c{i}": {str(k): int(v) for k, v in zip(*np.unique(np.asarray(labels)[p], return_counts=True))}
        for i, p in enumerate(parts)
    }


@pytest.mark.parametrize("method", PARTITIONERS)
def test_deterministic_and_exact_cover(method):
    first, again, other = _parts(method, seed=3), _parts(method, seed=3), _parts(method, seed=4)
    assert first == again
    assert sorted(i for part in first for i in part) == list(range(len(LABELS)))
    assert min(len(part) for part in first) >= 4
    if method not in ("natural",):
        assert first != other, "a different seed should give a different partition"


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(["iid", "dirichlet", "quantity", "shards"]),
    num_examples=st.integers(40, 300),
    num_clients=st.integers(1, 6),
    num_labels=st.integers(2, 6),
    seed=st.integers(0, 10_000),
)
def test_cover_property(method, num_examples, num_clients, num_labels, seed):
    labels = [i % num_labels for i in range(num_examples)]
    try:
        parts = partition_indices(num_examples, num_clients, method, labels, alpha=1.0, min_size=2, seed=seed)
    except ValueError:
        return  # an infeasible draw must be an error, never a silent bad split
    assert sorted(i for part in parts for i in part) == list(range(num_examples))
    assert len(parts) == num_clients and min(map(len, parts)) >= 2


def test_smaller_alpha_concentrates_labels():
    def concentration(method: str, alpha: float) -> float:
        return float(np.mean([mean_max_label_share(_counts(_parts(method, s, alpha=alpha))) for s in range(8)]))

    dirichlet = [concentration("dirichlet", alpha) for alpha in (0.1, 1.0, 100.0)]
    assert dirichlet[0] > dirichlet[1] > dirichlet[2], dirichlet
    assert dirichlet[2] < 0.3  # near IID: 1/5 labels each

    def size_spread(alpha: float) -> float:
        return float(np.mean([np.std([len(p) for p in _parts("quantity", s, alpha=alpha)]) for s in range(8)]))

    assert size_spread(0.1) > size_spread(10.0)


def test_natural_and_shards_label_structure():
    natural = _counts(_parts("natural"))
    assert all(len(counts) == 1 for counts in natural.values())
    shards = _counts(_parts("shards", num_clients=5, shards_per_client=2))
    assert all(len(counts) == 2 for counts in shards.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "dirichlet", "alpha": 0.0}, "alpha=0.0"),
        ({"method": "quantity", "alpha": -1.0}, "alpha=-1.0"),
        ({"method": "iid", "num_clients": 500}, "num_clients=500"),
        ({"method": "iid", "num_clients": 0}, "num_clients=0"),
        ({"method": "natural", "num_clients": 4}, "num_clients=4"),
        ({"method": "shards", "shards_per_client": 9}, "shards_per_client=9"),
        ({"method": "shards", "num_clients": 2, "shards_per_client": 1}, "shards_per_client=1"),
        ({"method": "dirichlet", "labels": None}, "label"),
        ({"method": "bogus"}, "bogus"),
        ({"method": "dirichlet", "alpha": 0.01, "min_size": 90, "num_clients": 4}, "alpha=0.01"),
    ],
)
def test_bad_inputs_name_the_value(kwargs, match):
    kwargs = {"num_clients": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition_indices(len(LABELS), kwargs.pop("num_clients"), **{"labels": LABELS, **kwargs})


def test_natural_partition_rejects_an_undersized_client():
    labels = ["a"] * 50 + ["b"] * 2
    with pytest.raises(ValueError, match="client 1 only 2 examples"):
        partition_indices(len(labels), 2, "natural", labels, min_size=3)


def test_report_table_and_plot(tmp_path):
    counts = _counts(_parts("dirichlet", alpha=0.3))
    table = describe_partition(counts)
    assert table.splitlines()[0].startswith("| client | l0 | l1")
    assert "| all |" in table and str(len(LABELS)) in table.splitlines()[-1]
    path = plot_partition(counts, tmp_path / "plots" / "partition.png")
    assert path.stat().st_size > 1000
