"""AggregationHub behaviour on a real (tiny Mixtral) adapter layout: the issue's 'what it must show' list."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from hf_fcmoe.adapters.layout import split_expert_a, split_expert_b
from hf_fcmoe.aggregation import METHODS, AggregationHub, ClientUpdate
from tests.conftest import make_state, tiny_mixtral_layout

EXACT_CAPABLE = ("fcmoe", "fedavg", "fedgh", "fedmoe")
FAST = settings(max_examples=10, deadline=None)


@pytest.fixture(scope="module")
def layout():
    return tiny_mixtral_layout()


def make_updates(layout, glob, num=4, seed=1, scale=0.05, common=0.0, counts=None):
    """Clients = global + common direction + own noise; counts default to all experts active."""
    gen = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in glob.items()}
    updates = []
    for i in range(num):
        state = {k: v + scale * (common * shared[k] + torch.randn(v.shape, generator=gen)) for k, v in glob.items()}
        c = (
            counts[i]
            if counts is not None
            else torch.randint(1, 9, (layout.num_layers, layout.num_experts), generator=gen)
        )
        updates.append(ClientUpdate(f"client{i}", state, num_examples=10 * (i + 1), expert_counts=c))
    return updates


def hub_for(layout, method, **options):
    if method in ("fedadam", "fedyogi"):
        options.setdefault("server_lr", 1e-2)
    return AggregationHub(layout, method=method, **options)


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def products(layout, state):
    return {
        pair.b_key: (pair.expert_factors(state)[0] @ pair.expert_factors(state)[1]) * pair.scaling
        for pair in layout.pairs
    }


# ---------------------------------------------------------------- API and contract
def test_unknown_method_and_option_are_named(layout):
    with pytest.raises(ValueError, match="nonsense"):
        AggregationHub(layout, method="nonsense")
    with pytest.raises(TypeError, match="bogus"):
        AggregationHub(layout, method="fcmoe", bogus=1)
    with pytest.raises(TypeError, match="density"):
        AggregationHub(layout, method="fedavg", density=0.5)
    with pytest.raises(ValueError, match="lowrank"):
        AggregationHub(layout, method="fcmoe", lowrank="dense")
    assert set(METHODS) >= {
        "fcmoe",
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "ties",
        "dare_ties",
        "fedgh",
        "fedmoe",
        "local",
    }


def test_retention_flags(layout):
    hub = AggregationHub(layout, "fcmoe")
    assert hub.uses_retention and hub.retention_lambda == 0.5
    assert not AggregationHub(layout, "fcmoe", retention=False).uses_retention
    assert not AggregationHub(layout, "fedavg").uses_retention


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_reports_json(layout, method):
    glob = make_state(layout, 0)
    result = hub_for(layout, method).aggregate(glob, make_updates(layout, glob), round=3)
    assert not result.failed
    for key, tensor in glob.items():
        assert result.global_state[key].shape == tensor.shape and result.global_state[key].dtype == tensor.dtype
    diag = json.loads(json.dumps(result.diagnostics))
    assert len(diag["conflict_rate_per_layer"]) == layout.num_layers
    assert len(diag["conflicts"]) == layout.num_layers and len(diag["conflicts"][0]) == layout.num_experts
    assert isinstance(diag["conflict_rate"], float) and diag["rejected"] == {}
    json.dumps(result.weights)
    assert set(result.personalized) == {f"client{i}" for i in range(4)}


def test_local_keeps_global_and_personalizes_to_own_state(layout):
    glob = make_state(layout, 0)
    updates = make_updates(layout, glob)
    result = AggregationHub(layout, "local").aggregate(glob, updates)
    assert_states_close(result.global_state, glob, rtol=0, atol=0)
    for update in updates:
        assert result.personalized[update.client_id] is update.state


# ---------------------------------------------------------------- basic algebra
@pytest.mark.parametrize("lowrank", ["factor", "exact"])
@pytest.mark.parametrize("method", ["fedavg", "fcmoe"])
def test_one_client_returns_its_state(layout, method, lowrank):
    glob = make_state(layout, 0)
    update = make_updates(layout, glob, num=1)[0]
    result = AggregationHub(layout, method, lowrank=lowrank).aggregate(glob, [update])
    if lowrank == "factor":
        assert_states_close(result.global_state, update.state)
    else:  # exact mode re-factorises: the products match, the factors may be re-gauged
        got, want = products(layout, result.global_state), products(layout, update.state)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    assert_states_close(result.personalized["client0"], result.global_state, rtol=0, atol=0)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("local", "fedadam", "fedyogi")])
def test_identical_updates_return_that_update(layout, method):
    glob = make_state(layout, 0)
    one = make_updates(layout, glob, num=1)[0]
    updates = [ClientUpdate(f"c{i}", one.state, 10 + i, one.expert_counts) for i in range(3)]
    result = AggregationHub(layout, method, **({"density": 1.0} if "ties" in method else {})).aggregate(glob, updates)
    if "ties" in method:  # dense re-factorisation: compare products
        got, want = products(layout, result.global_state), products(layout, one.state)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    else:
        assert_states_close(result.global_state, one.state)
    assert result.diagnostics["conflict_rate"] == 0.0


@FAST
@given(st.permutations(range(4)), st.sampled_from(METHODS), st.sampled_from(["factor", "exact"]))
def test_permuting_clients_changes_nothing(layout, order, method, lowrank):
    glob = make_state(layout, 0)
    updates = make_updates(layout, glob, common=0.5)
    options = {"lowrank": lowrank} if method in EXACT_CAPABLE else {}
    first = hub_for(layout, method, **options).aggregate(glob, updates, round=1)
    second = hub_for(layout, method, **options).aggregate(glob, [updates[i] for i in order], round=1)
    assert_states_close(first.global_state, second.global_state)
    assert first.diagnostics["conflicts"] == second.diagnostics["conflicts"]


# ---------------------------------------------------------------- fcmoe semantics
def factor_deltas(layout, pair, glob, updates):
    g_b, g_a = split_expert_b(glob[pair.b_key], pair.num_experts), split_expert_a(glob[pair.a_key], pair.num_experts)
    return [
        (
            split_expert_b(u.state[pair.b_key], pair.num_experts) - g_b,
            split_expert_a(u.state[pair.a_key], pair.num_experts) - g_a,
        )
        for u in updates
    ]


def test_no_conflict_equals_importance_weighted_average(layout):
    glob = make_state(layout, 0)
    updates = make_updates(layout, glob, common=30.0)  # a dominant shared direction: no negative cosines
    # factor-space norms and conflicts (the default decides them on the products: tests/test_conflict_space.py)
    result = AggregationHub(layout, "fcmoe", kappa=None, conflict_space="factor").aggregate(glob, updates)
    assert result.diagnostics["conflict_rate"] == 0.0
    sizes = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    for layer in range(layout.num_layers):
        pairs = [p for p in layout.by_kind("expert") if p.layer == layer]
        deltas = [factor_deltas(layout, p, glob, updates) for p in pairs]
        for e in range(layout.num_experts):
            norms = torch.tensor(
                [
                    sum(float(d[i][0][e].double().square().sum() + d[i][1][e].double().square().sum()) for d in deltas)
                    ** 0.5
                    for i in range(len(updates))
                ],
                dtype=torch.float64,
            )
            freq = torch.tensor([float(u.expert_counts[layer, e] / u.expert_counts[layer].sum()) for u in updates])
            c = sizes * freq * norms
            c = c / c.sum()
            for pair, d in zip(pairs, deltas):
                want_b = split_expert_b(glob[pair.b_key], pair.num_experts)[e] + sum(
                    ci * di[0][e] for ci, di in zip(c, d)
                )
                got_b = split_expert_b(result.global_state[pair.b_key], pair.num_experts)[e]
                torch.testing.assert_close(got_b, want_b.float(), rtol=1e-5, atol=1e-6)
                assert result.weights["client0"][f"L{layer}.E{e}"] == pytest.approx(float(c[0]))


@pytest.mark.parametrize("lowrank", ["factor", "exact"])
def test_projection_off_uniform_importance_equals_fedavg(layout, lowrank):
    glob = make_state(layout, 0)
    updates = make_updates(layout, glob)
    fcmoe = AggregationHub(layout, "fcmoe", projection=False, importance=False, lowrank=lowrank).aggregate(
        glob, updates
    )
    fedavg = AggregationHub(layout, "fedavg", lowrank=lowrank).aggregate(glob, updates)
    assert_states_close(fcmoe.global_state, fedavg.global_state, rtol=1e-4, atol=1e-5)


def conflicting_updates(layout, glob):
    """Three clients agree on a shared direction, a fourth (small) one pushes against it on every tensor."""
    updates = make_updates(layout, glob, num=4, common=5.0, scale=0.02)
    rebel = updates[3]
    rebel.num_examples = 2
    for key, tensor in rebel.state.items():
        rebel.state[key] = glob[key] - 0.5 * (tensor - glob[key])
    return updates


@pytest.mark.parametrize("lowrank", ["factor", "exact"])
def test_conflicts_are_projected_and_retained(layout, lowrank):
    glob = make_state(layout, 0)
    updates = conflicting_updates(layout, glob)
    hub = AggregationHub(layout, "fcmoe", lowrank=lowrank, server_lr=1.0)
    result = hub.aggregate(glob, updates)
    diag = result.diagnostics
    assert diag["conflicts"] == [[1] * layout.num_experts] * layout.num_layers
    assert diag["conflict_rate_per_layer"] == [0.25] * layout.num_layers
    expert_keys = {k for p in layout.by_kind("expert") for k in (p.a_key, p.b_key)}
    for update in updates:
        residual, personal = result.residuals[update.client_id], result.personalized[update.client_id]
        for key, value in result.global_state.items():  # personalized == global + lambda * residual, element-wise
            assert torch.equal(personal[key], value + hub.retention_lambda * residual[key])
            if key not in expert_keys or update.client_id != "client3":
                assert not residual[key].any(), key
    assert any(result.residuals["client3"][k].any() for k in expert_keys)


def test_importance_only_ablation_measures_conflicts_without_acting_on_them(layout):
    glob = make_state(layout, 0)
    updates = conflicting_updates(layout, glob)
    ablation = AggregationHub(layout, "fcmoe", projection=False, retention=False).aggregate(glob, updates)
    full = AggregationHub(layout, "fcmoe").aggregate(glob, updates)
    assert ablation.diagnostics["conflicts"] == full.diagnostics["conflicts"]  # the same conflicts are seen
    assert not ablation.residuals or not any(t.any() for r in ablation.residuals.values() for t in r.values())
    expert_b = layout.by_kind("expert")[0].b_key
    assert not torch.allclose(ablation.global_state[expert_b], full.global_state[expert_b])  # but not projected


def test_factor_mode_global_is_weighted_sum_of_projected_updates(layout):
    glob = make_state(layout, 0)
    updates = conflicting_updates(layout, glob)
    result = AggregationHub(layout, "fcmoe", server_lr=0.7).aggregate(glob, updates)
    lam = 0.5
    for pair in layout.by_kind("expert"):
        deltas = factor_deltas(layout, pair, glob, updates)
        for e in range(layout.num_experts):
            merged = split_expert_b(glob[pair.b_key], pair.num_experts)[e].clone()
            for update, (d_b, _) in zip(updates, deltas):
                w = result.weights[update.client_id][f"L{pair.layer}.E{e}"]
                rho = split_expert_b(result.residuals[update.client_id][pair.b_key], pair.num_experts)[e]
                assert torch.equal(rho * lam, rho * lam)  # residual is state-shaped and finite
                merged += 0.7 * w * (d_b[e] - rho)  # projected = original - residual
            got = split_expert_b(result.global_state[pair.b_key], pair.num_experts)[e]
            torch.testing.assert_close(got, merged, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- exact low-rank mode
@pytest.mark.parametrize("method", ["fedavg", "fcmoe"])
def test_exact_mode_equals_dense_weighted_sum_when_rank_fits(layout, method):
    """All clients share the global A, so every merged product has rank r: exact mode must reproduce it."""
    glob = make_state(layout, 0, scale=0.3)
    updates = make_updates(layout, glob, scale=0.3)
    for update in updates:
        for pair in layout.pairs:
            update.state[pair.a_key] = glob[pair.a_key].clone()
    result = (
        AggregationHub(layout, method, lowrank="exact", projection=False, server_lr=0.8)
        if method == "fcmoe"
        else AggregationHub(layout, method, lowrank="exact", server_lr=0.8)
    )
    result = result.aggregate(glob, updates)
    assert result.diagnostics["truncation_error"]["max"] < 1e-4
    before, after = products(layout, glob), products(layout, result.global_state)
    client_products = [products(layout, u.state) for u in updates]
    for pair in layout.by_kind("expert"):
        for e in range(layout.num_experts):
            want = (
                sum(
                    result.weights[u.client_id][f"L{pair.layer}.E{e}"] * (cp[pair.b_key][e] - before[pair.b_key][e])
                    for u, cp in zip(updates, client_products)
                )
                * 0.8
            )
            got = after[pair.b_key][e] - before[pair.b_key][e]
            assert (got - want).norm() <= 1e-4 * want.norm()


def test_exact_mode_reports_truncation_when_rank_does_not_fit(layout):
    glob = make_state(layout, 0)
    result = AggregationHub(layout, "fcmoe", lowrank="exact").aggregate(glob, make_updates(layout, glob, scale=0.5))
    assert 0 < result.diagnostics["truncation_error"]["max"] < 1


# ---------------------------------------------------------------- ties / dare through the hub
def test_ties_expert_matches_peft_then_rank_r(layout):
    glob = make_state(layout, 0)
    updates = make_updates(layout, glob)
    result = AggregationHub(layout, "ties", density=0.5).aggregate(glob, updates)
    pair = layout.by_kind("expert")[0]
    before = products(layout, glob)[pair.b_key]
    sizes = torch.tensor([float(u.num_examples) for u in updates])
    for e in range(layout.num_experts):
        deltas = [products(layout, u.state)[pair.b_key][e] - before[e] for u in updates]
        merged = before[e] + merge_utils.ties(deltas, sizes / sizes.mean(), 0.5, "total")
        u, s, vh = torch.linalg.svd(merged.double())
        best = (u[:, : pair.rank] * s[: pair.rank]) @ vh[: pair.rank]
        torch.testing.assert_close(
            products(layout, result.global_state)[pair.b_key][e].double(), best, rtol=1e-3, atol=1e-4
        )


# ---------------------------------------------------------------- routing rules
MASKED_METHODS = [
    ("fcmoe", "factor"),
    ("fcmoe", "exact"),
    ("fedmoe", "factor"),
    ("fedmoe", "exact"),
    ("fedgh", "factor"),
    ("fedgh", "exact"),
    ("ties", None),
    ("dare_ties", None),
]


@pytest.mark.parametrize(("method", "lowrank"), MASKED_METHODS)
def test_inactive_experts_untouched_and_router_rows_follow(layout, method, lowrank):
    glob = make_state(layout, 0)
    counts = [torch.randint(1, 9, (layout.num_layers, layout.num_experts)) for _ in range(4)]
    for c in counts:
        c[0, 1] = 0  # nobody routed to (layer 0, expert 1)
    counts[0][1, 2] = 0  # client0 never used (layer 1, expert 2): its delta there must be ignored
    updates = make_updates(layout, glob, counts=counts)
    options = {"lowrank": lowrank} if lowrank else {}
    result = AggregationHub(layout, method, **options).aggregate(glob, updates)
    for pair in layout.by_kind("expert"):
        if pair.layer == 0:
            for split, key in ((split_expert_b, pair.b_key), (split_expert_a, pair.a_key)):
                assert torch.equal(
                    split(result.global_state[key], pair.num_experts)[1], split(glob[key], pair.num_experts)[1]
                )
    assert result.diagnostics["untouched_experts"] == 1
    assert result.diagnostics["active_clients"][1][2] == 3
    # client0's delta on (1, 2) is ignored: changing it changes nothing
    updates[0].state = {k: v.clone() for k, v in updates[0].state.items()}
    for pair in layout.by_kind("expert"):
        if pair.layer == 1:
            split_expert_a(updates[0].state[pair.a_key], pair.num_experts)[2] += 5.0
    again = AggregationHub(layout, method, **options).aggregate(glob, updates)
    for pair in layout.by_kind("expert"):
        torch.testing.assert_close(
            products(layout, again.global_state)[pair.b_key], products(layout, result.global_state)[pair.b_key]
        )
    router = layout.router_of_layer(0)
    row_before = (glob[router.b_key] @ glob[router.a_key])[1]
    row_after = (result.global_state[router.b_key] @ result.global_state[router.a_key])[1]
    if lowrank == "factor" and method != "fedgh":
        assert torch.equal(result.global_state[router.b_key][1], glob[router.b_key][1])
    elif lowrank == "exact" or method in ("ties", "dare_ties"):
        torch.testing.assert_close(row_after, row_before, rtol=1e-4, atol=1e-5)


def test_router_rows_follow_expert_weights_and_attention_is_data_size(layout):
    glob = make_state(layout, 0)
    updates = make_updates(layout, glob)
    result = AggregationHub(layout, "fcmoe").aggregate(glob, updates)
    fedavg = AggregationHub(layout, "fedavg").aggregate(glob, updates)
    for pair in layout.by_kind("dense"):
        for key in (pair.a_key, pair.b_key):
            torch.testing.assert_close(result.global_state[key], fedavg.global_state[key])
    router = layout.router_of_layer(1)
    torch.testing.assert_close(result.global_state[router.a_key], fedavg.global_state[router.a_key])
    for e in range(layout.num_experts):
        want = glob[router.b_key][e] + sum(
            result.weights[u.client_id][f"L1.E{e}"] * (u.state[router.b_key][e] - glob[router.b_key][e])
            for u in updates
        )
        torch.testing.assert_close(result.global_state[router.b_key][e], want, rtol=1e-5, atol=1e-6)


def test_server_lr_scales_fedavg_step(layout):
    glob = make_state(layout, 0)
    updates = make_updates(layout, glob)
    plain = AggregationHub(layout, "fedavg").aggregate(glob, updates).global_state
    scaled = AggregationHub(layout, "fedavg", server_lr=1.5).aggregate(glob, updates).global_state
    for key in glob:
        torch.testing.assert_close(scaled[key] - glob[key], 1.5 * (plain[key] - glob[key]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- server optimizer state
@pytest.mark.parametrize("method", ["fedadam", "fedyogi"])
def test_server_optimizer_checkpoint_resumes_exactly(layout, method):
    glob = make_state(layout, 0)
    rounds = [make_updates(layout, glob, seed=s) for s in (1, 2)]
    straight = AggregationHub(layout, method, server_lr=1e-2)
    state = straight.aggregate(glob, rounds[0]).global_state
    checkpoint = straight.state_dict()
    final = straight.aggregate(state, rounds[1]).global_state
    resumed = AggregationHub(layout, method, server_lr=1e-2)
    resumed.load_state_dict(checkpoint)
    assert_states_close(resumed.aggregate(state, rounds[1]).global_state, final, rtol=0, atol=0)
    assert AggregationHub(layout, "fcmoe").state_dict() == {}


# ---------------------------------------------------------------- bad input
def test_bad_updates_are_rejected_by_name(layout):
    glob = make_state(layout, 0)
    good = make_updates(layout, glob, num=2)
    key = next(iter(glob))
    rank_key = layout.by_kind("expert")[0].a_key
    bad = []

    def variant(cid, **changes):
        base = make_updates(layout, glob, num=1, seed=7)[0]
        state = dict(base.state)
        state.update(changes.pop("state", {}))
        for k in changes.pop("drop", []):
            state.pop(k)
        fields = {"client_id": cid, "state": state, "num_examples": 5, "expert_counts": base.expert_counts, **changes}
        bad.append(ClientUpdate(**fields))

    variant("missing", drop=[key])
    variant("extra", state={"unexpected.weight": torch.zeros(1)})
    variant("shape", state={key: torch.zeros(3, 3)})
    variant("dtype", state={key: glob[key].double()})
    variant("nan", state={key: torch.full_like(glob[key], float("nan"))})
    variant("rank", state={rank_key: torch.zeros(glob[rank_key].shape[0] * 2, glob[rank_key].shape[1])})
    variant("zero", num_examples=0)
    variant("negative", num_examples=-3)
    variant("counts", expert_counts=torch.ones(1, 1, dtype=torch.long))
    duplicate = ClientUpdate(good[0].client_id, good[0].state, 3, good[0].expert_counts)
    result = AggregationHub(layout, "fcmoe").aggregate(glob, good + bad + [duplicate])
    rejected = result.diagnostics["rejected"]
    expected = {
        "missing": "missing",
        "extra": "unexpected",
        "shape": "shape",
        "dtype": "dtype",
        "nan": "NaN",
        "rank": "rank",
        "zero": "num_examples",
        "negative": "num_examples",
        "counts": "expert_counts",
    }
    for cid, word in expected.items():
        assert cid in rejected[cid] and word in rejected[cid], rejected[cid]
    # a duplicated id rejects every copy: the server cannot tell the real client from an impostor
    assert "duplicated" in rejected[good[0].client_id]
    assert result.diagnostics["num_accepted"] == 1 and not result.failed
    clean = AggregationHub(layout, "fcmoe").aggregate(glob, good[1:])
    assert_states_close(result.global_state, clean.global_state, rtol=0, atol=0)


def test_all_rejected_returns_global_and_fails(layout):
    glob = make_state(layout, 0)
    update = make_updates(layout, glob, num=1)[0]
    update.num_examples = 0
    result = AggregationHub(layout, "fcmoe").aggregate(glob, [update])
    assert result.failed and result.diagnostics["rejected"]
    assert_states_close(result.global_state, glob, rtol=0, atol=0)
    json.dumps(result.diagnostics)


def test_personalized_states_are_lazy_read_only_mappings(layout):
    """personalized[c] computes global + lambda * residual on access; dict() materialises it."""
    from collections.abc import Mapping

    glob = make_state(layout, 0)
    result = AggregationHub(layout, "fcmoe").aggregate(glob, conflicting_updates(layout, glob))
    personal = result.personalized["client3"]
    assert isinstance(personal, Mapping) and not isinstance(personal, dict)
    assert list(personal) == list(result.global_state) and len(personal) == len(result.global_state)
    materialised = dict(personal)
    for key, tensor in result.global_state.items():
        assert torch.equal(materialised[key], tensor + 0.5 * result.residuals["client3"][key])
    with pytest.raises(TypeError):
        personal["x"] = torch.zeros(1)  # read-only
