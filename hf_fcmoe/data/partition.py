"""Seeded non-IID partitioners: every example goes to exactly one client.

Written here rather than wrapping `flwr-datasets`: its latest release (0.6.1) requires
``datasets<5``, which does not resolve with this stack (datasets 5.x, transformers 5.x), and its
partitioners operate on a `datasets.Dataset` column while these work on plain index lists, which
the engines and tests need anyway. Semantics follow flwr-datasets' Dirichlet, natural-id and
pathological partitioners and the usual Dirichlet quantity skew.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PARTITIONERS = ("iid", "dirichlet", "natural", "quantity", "shards")
NEEDS_LABELS = ("dirichlet", "natural", "shards")


def _check(num_examples: int, num_clients: int, min_size: int) -> None:
    if num_clients <= 0:
        raise ValueError(f"num_clients must be positive, got num_clients={num_clients}")
    if min_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_size}")
    if num_examples < num_clients * max(min_size, 1):
        raise ValueError(
            f"num_clients={num_clients} clients with at least {max(min_size, 1)} examples each need "
            f"{num_clients * max(min_size, 1)} examples, but the dataset has {num_examples}"
        )


def _check_alpha(alpha: float, method: str) -> None:
    if not alpha > 0:
        raise ValueError(f"{method} partition needs alpha > 0, got alpha={alpha}")


def _check_min_size(parts: list[list[int]], min_size: int, method: str, hint: str) -> list[list[int]]:
    """Every client must get at least max(min_size, 1) examples: an empty client is never valid."""
    sizes = [len(p) for p in parts]
    smallest = int(np.argmin(sizes))
    if sizes[smallest] < max(min_size, 1):
        raise ValueError(
            f"{method} partition gives client {smallest} only {sizes[smallest]} examples "
            f"(min_partition_size={min_size}); {hint}"
        )
    return [sorted(p) for p in parts]


def _label_array(labels: Sequence, num_examples: int) -> np.ndarray:
    labels = np.asarray([str(label) for label in labels])
    if len(labels) != num_examples:
        raise ValueError(f"got {len(labels)} labels for num_examples={num_examples}")
    return labels


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int, max_tries: int = 1000
) -> list[list[int]]:
    """Label skew: for each label, client shares ~ Dirichlet(alpha); resampled until every client has min_size."""
    _check_alpha(alpha, "dirichlet")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= max(min_size, 1):
            return [sorted(p) for p in parts]
    raise ValueError(
        f"could not draw a Dirichlet(alpha={alpha}) partition giving each of {num_clients} clients "
        f">= {max(min_size, 1)} examples in {max_tries} tries; raise alpha or lower min_partition_size"
    )


def natural_partition(labels: np.ndarray, num_clients: int, min_size: int) -> list[list[int]]:
    """One client per distinct value (domain, author, category): the data's own non-IID split."""
    values = np.unique(labels)
    if len(values) != num_clients:
        raise ValueError(
            f"natural partition makes one client per distinct value: the column has {len(values)} values "
            f"({', '.join(values[:10])}{', ...' if len(values) > 10 else ''}), but num_clients={num_clients}"
        )
    parts = [np.flatnonzero(labels == value).tolist() for value in values]
    return _check_min_size(parts, min_size, "natural", "drop that value or lower min_partition_size")


def quantity_partition(num_examples: int, num_clients: int, alpha: float, min_size: int, seed: int) -> list[list[int]]:
    """Quantity skew: IID content, client sizes = min_size + Dirichlet(alpha) shares of the rest."""
    _check_alpha(alpha, "quantity")
    rng = np.random.default_rng(seed)
    floor = max(min_size, 1)
    rest = num_examples - floor * num_clients
    shares = rng.dirichlet(np.full(num_clients, alpha))
    extra = np.floor(shares * rest).astype(int)
    extra[np.argsort(-(shares * rest - extra))[: rest - extra.sum()]] += 1  # largest remainders
    cuts = np.cumsum(floor + extra)[:-1]
    return [sorted(part.tolist()) for part in np.split(rng.permutation(num_examples), cuts)]


def shard_partition(
    labels: np.ndarray, num_clients: int, shards_per_client: int, min_size: int, seed: int
) -> list[list[int]]:
    """Pathological skew: each client holds exactly `shards_per_client` labels, each label's rows split evenly
    among the clients holding it. Labels are dealt consecutively from a seeded permutation, so all are covered."""
    values = np.unique(labels)
    if not 0 < shards_per_client <= len(values):
        raise ValueError(f"shards_per_client={shards_per_client} must be between 1 and the {len(values)} labels")
    if num_clients * shards_per_client < len(values):
        raise ValueError(
            f"num_clients={num_clients} x shards_per_client={shards_per_client} cannot cover all {len(values)} "
            "labels; every example must go to a client"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(values)
    holders: dict[str, list[int]] = {value: [] for value in values}
    for client in range(num_clients):
        for j in range(shards_per_client):
            holders[order[(client * shards_per_client + j) % len(values)]].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for value, clients in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == value))
        for client, chunk in zip(clients, np.array_split(idx, len(clients))):
            parts[client].extend(chunk.tolist())
    return _check_min_size(parts, min_size, "shards", "use fewer clients, more shards_per_client or more data")


def partition_indices(
    num_examples: int,
    num_clients: int,
    method: str = "dirichlet",
    labels: Sequence | None = None,
    alpha: float = 0.5,
    min_size: int = 1,
    seed: int = 0,
    shards_per_client: int = 2,
) -> list[list[int]]:
    """Sorted indices per client for `method`; deterministic for a seed, each example exactly once.

    `labels` drive dirichlet/shards (label skew) and natural (one client per value); `alpha` drives
    dirichlet (label skew) and quantity (size skew): smaller alpha = more skewed.
    """
    if method not in PARTITIONERS:
        raise ValueError(f"unknown partition {method!r}; available: {', '.join(PARTITIONERS)}")
    _check(num_examples, num_clients, min_size)
    if method in NEEDS_LABELS:
        if labels is None:
            raise ValueError(f"the {method} partition needs a label (or partition) column")
        label_array = _label_array(labels, num_examples)
    if method == "iid":
        return iid_partition(num_examples, num_clients, seed)
    if method == "quantity":
        return quantity_partition(num_examples, num_clients, alpha, min_size, seed)
    if method == "dirichlet":
        return dirichlet_partition(label_array, num_clients, alpha, min_size, seed)
    if method == "natural":
        return natural_partition(label_array, num_clients, min_size)
    return shard_partition(label_array, num_clients, shards_per_client, min_size, seed)
