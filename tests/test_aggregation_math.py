"""Properties of the pure merging math (weighting, projection, low-rank algebra, TIES/DARE, server optimizers)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from hf_fcmoe.adapters.lora import build_lora_config, expert_layout_from_configs
from hf_fcmoe.aggregation import lowrank
from hf_fcmoe.aggregation.projection import consensus_projection, pcgrad_coefficients
from hf_fcmoe.aggregation.server_opt import ServerOptimizer
from hf_fcmoe.aggregation.ties import dare_ties_merge, ties_merge
from hf_fcmoe.aggregation.weighting import importance_weights, masked_median

FAST = settings(max_examples=25, deadline=None)


def _vectors(seed: int, num: int, dim: int, common: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=gen, dtype=torch.float64)
    return common * base + torch.randn(num, dim, generator=gen, dtype=torch.float64)


def test_importance_weights_formula():
    sizes = torch.tensor([10.0, 20.0, 30.0, 40.0])
    freq = torch.tensor([[0.5, 0.25, 0.1, 0.0]])
    norms = torch.tensor([[1.0, 2.0, 100.0, 5.0]])
    active = freq > 0
    weights = importance_weights(sizes, freq, norms, active, kappa=2.0)
    median = masked_median(norms, active)  # lower median of (1, 2, 100) = 2
    assert median.item() == 2.0
    scores = torch.tensor([10 * 0.5 * 1.0, 20 * 0.25 * 2.0, 30 * 0.1 * 4.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(weights[0], scores / scores.sum())
    none_active = importance_weights(sizes, freq, norms, torch.zeros_like(active))
    assert (none_active == 0).all()


@FAST
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 7), st.floats(0.0, 3.0), st.booleans())
def test_projection_removes_negative_components(seed, num, dim, common, leave_one_out):
    deltas = _vectors(seed, num, dim, common)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(num, generator=gen, dtype=torch.float64) * (torch.rand(num, generator=gen) > 0.2)
    weights = weights / weights.sum() if weights.sum() > 0 else torch.full((num,), 1.0 / num, dtype=torch.float64)
    proj = consensus_projection((deltas @ deltas.T)[None], weights[None], leave_one_out)
    consensus = proj_consensus = torch.einsum("ij,jd->id", _consensus(weights, leave_one_out), deltas)
    residuals = torch.einsum("ij,jd->id", proj.residual_coef[0], deltas)
    projected = deltas - residuals
    for i in range(num):
        if weights[i] > 0:
            assert projected[i] @ proj_consensus[i] >= -1e-9 * (1 + deltas[i].norm() * consensus[i].norm())
        if not proj.conflict[0, i]:
            assert torch.equal(residuals[i], torch.zeros(dim, dtype=torch.float64))
    torch.testing.assert_close(projected + residuals, deltas)
    merged = torch.einsum("i,id->d", weights, projected)
    torch.testing.assert_close(torch.einsum("j,jd->d", proj.merge_coef[0], deltas), merged)


def _consensus(weights: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
    from hf_fcmoe.aggregation.projection import consensus_coefficients

    return consensus_coefficients(weights[None], leave_one_out)[0]


def test_no_conflict_means_plain_weighted_average():
    deltas = _vectors(3, 5, 6, common=20.0)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    proj = consensus_projection((deltas @ deltas.T)[None], weights[None])
    assert not proj.conflict.any()
    torch.testing.assert_close(proj.merge_coef[0], weights)


def test_leave_one_out_reveals_a_dominant_conflicting_client():
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    deltas = torch.stack([v, v, -v])
    weights = torch.tensor([[0.2, 0.2, 0.6]], dtype=torch.float64)
    gram = (deltas @ deltas.T)[None]
    assert consensus_projection(gram, weights).conflict[0].tolist() == [True, True, False]
    assert consensus_projection(gram, weights, leave_one_out=True).conflict[0].tolist() == [True, True, True]


def test_pcgrad_two_opposing_updates():
    deltas = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    coef, touched = pcgrad_coefficients((deltas @ deltas.T)[None], torch.ones(1, 2, dtype=torch.bool))
    projected = coef[0] @ deltas
    assert touched.all()
    assert projected[0] @ deltas[1] >= -1e-12 and projected[1] @ deltas[0] >= -1e-12


@FAST
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))
def test_gram_inner_products_equal_dense(seed, rank, out_features, in_features):
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = (torch.randn(out_features, rank, generator=gen, dtype=torch.float64) for _ in range(2))
    a1, a2 = (torch.randn(rank, in_features, generator=gen, dtype=torch.float64) for _ in range(2))
    dense = ((b1 @ a1) * (b2 @ a2)).sum()
    torch.testing.assert_close(lowrank.lowrank_inner(b1, a1, b2, a2), dense)
    xb = torch.cat([b1, b2], 1)[None].float()
    xa = torch.cat([a1, a2], 0)[None].float()
    gram = lowrank.product_gram(*lowrank.gram_matrices(xb, xa), rank)[0]
    torch.testing.assert_close(gram[0, 1], dense, rtol=1e-4, atol=1e-4)


@FAST
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 4), st.booleans())
def test_refactor_is_the_truncated_svd_of_the_weighted_sum(seed, rank, num, shared_a):
    """Exact: when the merged rank fits (shared A or rank >= K) the rank-r factors reproduce it to 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = 12, 10
    bs = [torch.randn(out_features, rank, generator=gen) for _ in range(num)]
    shared = torch.randn(rank, in_features, generator=gen)
    as_ = [shared if shared_a else torch.randn(rank, in_features, generator=gen) for _ in range(num)]
    coef = torch.rand(1, num, generator=gen, dtype=torch.float64) + 0.1
    xb, xa = torch.cat(bs, 1)[None], torch.cat(as_, 0)[None]
    gram_b, gram_a = lowrank.gram_matrices(xb, xa)
    cols = lowrank.block_expand(coef, rank)
    gram_bw = cols[:, :, None] * gram_b * cols[:, None, :]
    target_rank = rank if shared_a else rank * num
    ref_a = (gram_a.reshape(1, num, rank, -1) * coef[:, :, None, None]).sum(1) if shared_a else gram_a
    t_a, t_b, err = lowrank.refactor(gram_a, gram_bw, ref_a, target_rank)
    new = (xb.double() @ (cols[:, :, None] * t_b)) @ (t_a @ xa.double())
    dense = sum(c * (b.double() @ a.double()) for c, b, a in zip(coef[0], bs, as_))
    assert (new[0] - dense).norm() <= 1e-4 * dense.norm()
    assert err.item() < 1e-4


def test_refactor_truncation_error_matches_dense_svd():
    gen = torch.Generator().manual_seed(0)
    rank, num = 2, 3
    xb, xa = torch.randn(1, 15, rank * num, generator=gen), torch.randn(1, rank * num, 11, generator=gen)
    gram_b, gram_a = lowrank.gram_matrices(xb, xa)
    t_a, t_b, err = lowrank.refactor(gram_a, gram_b, gram_a[:, :rank], rank)
    dense = (xb @ xa)[0].double()
    sv = torch.linalg.svdvals(dense)
    expected = (sv[rank:].square().sum() / sv.square().sum()).sqrt()
    torch.testing.assert_close(err[0], expected, rtol=1e-4, atol=1e-6)
    approx = (xb.double() @ t_b) @ (t_a @ xa.double())
    torch.testing.assert_close((dense - approx[0]).norm() / dense.norm(), expected, rtol=1e-3, atol=1e-6)


def test_factorize_dense_keeps_a_close_to_reference():
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(1, 9, 3, generator=gen), torch.randn(1, 3, 8, generator=gen)
    new_b, new_a, err = lowrank.factorize_dense(b @ a, 3, a)
    torch.testing.assert_close(new_b.float() @ new_a.float(), b @ a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_a.float(), a, rtol=1e-4, atol=1e-4)
    assert err.item() < 1e-6


@FAST
@given(
    st.integers(0, 10_000),
    st.integers(1, 4),
    st.sampled_from([0.1, 0.5, 0.9]),
    st.sampled_from(["total", "frequency"]),
)
def test_ties_and_dare_match_peft(seed, num, density, sign_method):
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.randn(num, 6, 5, generator=gen)
    weights = torch.rand(num, generator=gen) + 0.5
    expected = merge_utils.ties(list(deltas), weights, density, sign_method)
    torch.testing.assert_close(ties_merge(deltas, weights, density, sign_method), expected)
    torch.manual_seed(seed)
    expected = merge_utils.dare_ties(list(deltas), weights, density, sign_method)
    torch.manual_seed(seed)
    torch.testing.assert_close(dare_ties_merge(deltas, weights, density, sign_method), expected)


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_server_optimizer_step_and_resume(kind):
    param, delta = torch.zeros(3), torch.tensor([0.1, -0.2, 0.0])
    opt = ServerOptimizer(kind, lr=0.01)
    first = opt.step("w", param, delta)
    m = 0.1 * delta
    v = (
        0.99 * 1e-6 + 0.01 * delta.square()
        if kind == "adam"
        else 1e-6 - 0.01 * delta.square() * torch.sign(1e-6 - delta.square())
    )
    torch.testing.assert_close(first, 0.01 * m / (v.sqrt() + 1e-3))
    clone = ServerOptimizer(kind, lr=0.01)
    clone.load_state_dict(opt.state_dict())
    torch.testing.assert_close(clone.step("w", first, delta), opt.step("w", first, delta))


def test_factorize_dense_stays_balanced_when_the_reference_misses_the_row_space():
    """A reference A nearly orthogonal to the target's row space must not yield a huge B and a tiny A
    (TIES re-factorised that way every round blew ||B|| up 100x per round)."""
    gen = torch.Generator().manual_seed(3)
    rank, out_f, in_f = 3, 10, 12
    basis = torch.linalg.qr(torch.randn(in_f, in_f, generator=gen, dtype=torch.float64))[0]
    ref_a = basis[:rank].T.T.contiguous()[None] * 2.0  # rows span the first 3 directions
    rows = basis[rank : 2 * rank] + 1e-4 * basis[:rank]  # target rows: almost orthogonal to the reference
    target = (torch.randn(1, out_f, rank, generator=gen, dtype=torch.float64) @ rows[None]).float()
    new_b, new_a, err = lowrank.factorize_dense(target, rank, ref_a.float())
    torch.testing.assert_close(new_b.float() @ new_a.float(), target, rtol=1e-4, atol=1e-4)
    assert new_a.double().norm() == pytest.approx(ref_a.norm().item(), rel=1e-6)  # A keeps the reference's norm
    assert new_b.double().norm() * new_a.double().norm() <= 10 * target.double().norm() * rank
    assert err.item() < 1e-6


def test_ties_rounds_do_not_blow_up_the_factors():
    """Ten TIES rounds (trim to 20%, re-factorise to rank r): the factors stay finite and of moderate norm."""
    from hf_fcmoe.aggregation import AggregationHub
    from hf_fcmoe.models.families import build_tiny_moe, get_family
    from tests.test_aggregation_hub import make_state, make_updates

    model, _ = build_tiny_moe("mixtral")
    layout = expert_layout_from_configs(model.config, build_lora_config(get_family(model.config), r=4))
    hub = AggregationHub(layout, "ties", density=0.2)
    state = make_state(layout, seed=0, scale=0.3)
    for round_index in range(10):
        updates = make_updates(layout, state, num=3, seed=round_index + 1, scale=0.05)
        state = hub.aggregate(state, updates, round=round_index).global_state
    norms = {key: tensor.norm().item() for key, tensor in state.items()}
    assert all(torch.isfinite(t).all() for t in state.values())
    assert max(norms.values()) < 50, norms
