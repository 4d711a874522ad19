"""Chunked kernels (`streaming`) against dense references, and the hub paths built on them."""

import pytest
import torch

from hf_fcmoe.adapters.layout import split_expert_a, split_expert_b
from hf_fcmoe.aggregation import AggregationHub, lowrank, streaming
from tests.test_aggregation_hub import conflicting_updates, layout, make_state, make_updates  # noqa: F401

E, R, OUT, IN, M = 4, 3, 37, 29, 5


def sources(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = [torch.randn(OUT, E * R, generator=gen).to(dtype) for _ in range(M)]
    a = [torch.randn(E * R, IN, generator=gen).to(dtype) for _ in range(M)]
    return b, a


@pytest.fixture(params=[streaming.CHUNK_BYTES, 700], ids=["one-chunk", "many-chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_gram_equals_gram_of_materialised_deltas(chunk, dtype):
    b, a = sources(dtype)
    got = streaming.delta_gram(b, a, E)
    db = torch.stack([split_expert_b(x.float() - b[0].float(), E) for x in b[1:]], 1)  # (E, N, out, r)
    da = torch.stack([split_expert_a(x.float() - a[0].float(), E) for x in a[1:]], 1)
    flat = torch.cat([db.flatten(2), da.flatten(2)], -1).double()
    torch.testing.assert_close(got, flat @ flat.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_equals_per_expert_weighted_sum(chunk, dtype):
    b, a = sources(dtype)
    coef = torch.randn(2, M, E, dtype=torch.float64)
    coef[1, 2] = 0  # a source nobody uses is skipped
    out_b = streaming.combine(b, coef, E, "b", dtype)
    out_a = streaming.combine(a, coef, E, "a", dtype)
    for o in range(2):
        want_b = sum(coef[o, m].float()[:, None, None] * split_expert_b(b[m].float(), E) for m in range(M))
        want_a = sum(coef[o, m].float()[:, None, None] * split_expert_a(a[m].float(), E) for m in range(M))
        assert out_b[o].dtype == dtype and out_b[o].shape == b[0].shape
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(split_expert_b(out_b[o], E).float(), want_b, **tol)
        torch.testing.assert_close(split_expert_a(out_a[o], E).float(), want_a, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_derives_multiples_of_the_first_outputs_move(chunk, dtype):
    b, a = sources(dtype)
    coef = torch.randn(1, M, E, dtype=torch.float64)
    derived = torch.randn(2, E, dtype=torch.float64)
    for srcs, kind, split in ((b, "b", split_expert_b), (a, "a", split_expert_a)):
        plain = streaming.combine(srcs, coef, E, kind, torch.float32)[0]
        first, *extra = streaming.combine(srcs, coef, E, kind, dtype, derived=derived)
        assert len(extra) == 2 and all(t.dtype == dtype and t.shape == srcs[0].shape for t in extra)
        move = split(plain - srcs[0].float(), E)
        for d in range(2):
            want = derived[d].float()[:, None, None] * move
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
            torch.testing.assert_close(split(extra[d], E).float(), want, **tol)


@pytest.mark.parametrize("server_lr,dtype", [(1.0, torch.float32), (0.7, torch.float32), (0.7, torch.bfloat16)])
def test_derived_residuals_equal_recombined_ones(layout, server_lr, dtype, monkeypatch):  # noqa: F811
    """FC-MoE's residuals taken from the merged update's chunk equal the ones recombined from every source."""
    from hf_fcmoe.aggregation import blocks

    glob = make_state(layout, 0)
    updates = conflicting_updates(layout, glob)
    glob = {k: t.to(dtype) for k, t in glob.items()}
    for update in updates:
        update.state = {k: t.to(dtype) for k, t in update.state.items()}
    fast = AggregationHub(layout, "fcmoe", server_lr=server_lr).aggregate(glob, updates)
    calls = []
    original = blocks.BlockRound._residual_scales

    def spy(self, *args):
        calls.append(original(self, *args))
        return None  # force the general path

    monkeypatch.setattr(blocks.BlockRound, "_residual_scales", spy)
    slow = AggregationHub(layout, "fcmoe", server_lr=server_lr).aggregate(glob, updates)
    assert calls and all(c is not None for c in calls)  # the derived path was taken in the fast run
    for key, tensor in slow.global_state.items():
        assert torch.equal(fast.global_state[key], tensor)
    tol = {"rtol": 1e-4, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    for cid, residual in slow.residuals.items():
        for key, tensor in residual.items():
            assert fast.residuals[cid][key].dtype == dtype
            torch.testing.assert_close(fast.residuals[cid][key], tensor, **tol)


def test_leave_one_out_residuals_are_recombined(layout, monkeypatch):  # noqa: F811
    """With a per-client consensus the residuals are not multiples of the merge: the general path runs."""
    from hf_fcmoe.aggregation import blocks

    calls = []
    original = blocks.BlockRound._residual_scales
    monkeypatch.setattr(blocks.BlockRound, "_residual_scales", lambda self, *a: calls.append(original(self, *a)))
    glob = make_state(layout, 0)
    result = AggregationHub(layout, "fcmoe", leave_one_out=True).aggregate(glob, conflicting_updates(layout, glob))
    assert result.diagnostics["conflict_rate"] > 0
    assert any(tensor.any() for tensor in result.residuals["client3"].values())  # the recombined path ran
    assert calls and all(c is None for c in calls)


def test_stacked_grams_and_apply_equal_the_stacked_reference(chunk):
    b, a = sources()
    xb, xa = lowrank.stack_factors(b, a, E)
    gram_b, gram_a = streaming.stacked_grams(b, a, E)
    want_b, want_a = lowrank.gram_matrices(xb, xa)
    torch.testing.assert_close(gram_b, want_b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gram_a, want_a, rtol=1e-5, atol=1e-4)
    t_b = torch.randn(E, M * R, 2 * R, dtype=torch.float64)
    t_a = torch.randn(E, 2 * R, M * R, dtype=torch.float64)
    new_b, new_a = streaming.stacked_apply(b, a, E, t_b, t_a, torch.float32)
    prod_b, prod_a = torch.bmm(xb, t_b.float()), torch.bmm(t_a.float(), xa)
    for o in range(2):
        torch.testing.assert_close(split_expert_b(new_b[o], E), prod_b[:, :, o * R : (o + 1) * R])
        torch.testing.assert_close(split_expert_a(new_a[o], E), prod_a[:, o * R : (o + 1) * R])


def test_single_threaded_restores_the_thread_count():
    before = torch.get_num_threads()
    with lowrank.single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("lowrank_mode", ["factor", "exact"])
def test_non_conflicting_residuals_are_shared_zero_views(layout, lowrank_mode):  # noqa: F811
    glob = make_state(layout, 0)
    updates = conflicting_updates(layout, glob)
    hub = AggregationHub(layout, "fcmoe", lowrank=lowrank_mode)
    result = hub.aggregate(glob, updates)
    expert_keys = {k for p in layout.by_kind("expert") for k in (p.a_key, p.b_key)}
    for update in updates:
        residual, personal = result.residuals[update.client_id], result.personalized[update.client_id]
        assert residual.keys() == glob.keys()
        for key, value in result.global_state.items():
            assert torch.equal(personal[key], value + hub.retention_lambda * residual[key])
            assert residual[key].shape == value.shape and residual[key].dtype == value.dtype
            if key in expert_keys and update.client_id == "client3":
                assert residual[key].is_contiguous() and residual[key].any()
            else:  # no conflict: a zero view costing no memory, personalized is the global tensor itself
                assert residual[key].stride() == (0, 0) and not residual[key].any()
                assert personal[key] is value
                assert torch.equal(residual[key].contiguous(), torch.zeros_like(value))


@pytest.mark.parametrize("lowrank_mode", ["factor", "exact"])
@pytest.mark.parametrize("method", ["fcmoe", "fedgh", "fedmoe"])
def test_repeated_rounds_equal_a_fresh_hub(layout, method, lowrank_mode):  # noqa: F811
    glob = make_state(layout, 0)
    first, second = make_updates(layout, glob, seed=1), conflicting_updates(layout, glob)
    hub = AggregationHub(layout, method, lowrank=lowrank_mode)
    hub.aggregate(glob, first)
    again = hub.aggregate(glob, second)
    fresh = AggregationHub(layout, method, lowrank=lowrank_mode).aggregate(glob, second)
    for key in glob:
        assert torch.equal(again.global_state[key], fresh.global_state[key]), key
    for cid, residual in fresh.residuals.items():
        for key in residual:
            assert torch.equal(again.residuals[cid][key], residual[key]), (cid, key)
    assert again.diagnostics == fresh.diagnostics


def test_block_path_keeps_the_input_key_order(layout):  # noqa: F811
    glob = make_state(layout, 0)
    result = AggregationHub(layout, "fcmoe").aggregate(glob, make_updates(layout, glob))
    assert list(result.global_state) == list(glob)
