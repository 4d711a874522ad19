"""Where FC-MoE's conflicts are decided and what its projection and retention variants do (issue 16)."""

import pytest
import torch

from hf_fcmoe.adapters.layout import split_expert_a, split_expert_b
from hf_fcmoe.aggregation import AggregationHub, ClientUpdate
from hf_fcmoe.aggregation.projection import consensus_projection
from tests.conftest import make_state, tiny_mixtral_layout


@pytest.fixture(scope="module")
def layout():
    return tiny_mixtral_layout(("experts", "router"))


def test_inclusive_consensus_projection_only_lengthens_the_consensus():
    """The paper's consensus includes the conflicting client: the merge is (1 + sum_conflicting c_i |a_i|) * g."""
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(5, 6, 40, generator=gen, dtype=torch.float64)  # 5 blocks, 6 clients
    deltas[:, 4:] *= -0.5  # two clients push against the rest
    weights = torch.rand(5, 6, generator=gen, dtype=torch.float64)
    weights = weights / weights.sum(-1, keepdim=True)
    gram = deltas @ deltas.transpose(1, 2)
    proj = consensus_projection(gram, weights)
    assert proj.conflict.any()
    scale = 1 + (weights * proj.alpha.abs() * proj.conflict).sum(-1, keepdim=True)
    torch.testing.assert_close(proj.merge_coef, scale * weights)
    merged = torch.einsum("bn,bnd->bd", proj.merge_coef, deltas)
    consensus = torch.einsum("bn,bnd->bd", weights, deltas)
    torch.testing.assert_close(torch.cosine_similarity(merged, consensus, dim=-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(merged.norm(dim=-1) / consensus.norm(dim=-1), scale[:, 0])
    # leave-one-out changes the direction
    loo = consensus_projection(gram, weights, leave_one_out=True)
    merged_loo = torch.einsum("bn,bnd->bd", loo.merge_coef, deltas)
    assert torch.cosine_similarity(merged_loo, consensus, dim=-1).min() < 1 - 1e-6


def test_inclusive_consensus_on_the_hub_moves_along_the_consensus(layout):
    """On the hub (factor mode, factor-space conflicts): every expert's merged factor update has cosine 1 with
    the importance-weighted consensus of the client deltas and the length ratio of the formula."""
    glob = make_state(layout, 0)
    updates = []
    for i in range(4):
        sign = -0.5 if i == 3 else 1.0
        noise = make_state(layout, 10 + i, 0.02)
        shared = make_state(layout, 99, 0.05)
        state = {k: glob[k] + sign * shared[k] + noise[k] for k in glob}
        updates.append(ClientUpdate(f"c{i}", state, num_examples=10 + i))
    result = AggregationHub(layout, "fcmoe", conflict_space="factor").aggregate(glob, updates)
    assert result.diagnostics["conflict_rate"] > 0
    for layer in range(layout.num_layers):
        pairs = [p for p in layout.by_kind("expert") if p.layer == layer]
        for e in range(layout.num_experts):

            def flat(state, pairs=pairs, e=e):
                parts = []
                for p in pairs:
                    parts += [split_expert_b(state[p.b_key], p.num_experts)[e], split_expert_a(state[p.a_key], 4)[e]]
                return torch.cat([t.flatten() for t in parts]).double()

            deltas = torch.stack([flat(u.state) - flat(glob) for u in updates])
            c = torch.tensor([result.weights[u.client_id][f"L{layer}.E{e}"] for u in updates], dtype=torch.float64)
            g = c @ deltas
            alpha = deltas @ g / g.dot(g)
            expected = 1 + (c * alpha.abs() * (alpha < 0)).sum()
            merged = flat(result.global_state) - flat(glob)
            assert torch.cosine_similarity(merged, g, dim=0) == pytest.approx(1.0, abs=1e-5)
            assert float(merged.norm() / g.norm()) == pytest.approx(float(expected), rel=1e-4)


def gauge_flipped_updates(layout):
    """Three clients move every expert's B (zero at the start, as LoRA initialises it) by the same step; a fourth
    reaches the *same products* through the gauge (B, A) -> (-B, -A): its factor delta points away from the
    consensus, its product delta is the others'."""
    glob = make_state(layout, 0)
    expert_b = {p.b_key for p in layout.by_kind("expert")}
    expert_a = {p.a_key for p in layout.by_kind("expert")}
    glob = {k: torch.zeros_like(v) if k in expert_b else (0.05 * v if k in expert_a else v) for k, v in glob.items()}
    step = make_state(layout, 1, 0.05)
    updates = []
    for i in range(4):
        noise = make_state(layout, 20 + i, 1e-4)
        state = {k: glob[k] + step[k] + noise[k] if k in expert_b else glob[k] for k in glob}
        if i == 3:
            state = {k: -v if k in expert_b or k in expert_a else v for k, v in state.items()}
        updates.append(ClientUpdate(f"c{i}", state, num_examples=10))
    return glob, updates


def test_conflicts_are_decided_in_product_space_by_default(layout):
    glob, updates = gauge_flipped_updates(layout)
    factor = AggregationHub(layout, "fcmoe", conflict_space="factor").aggregate(glob, updates)
    product = AggregationHub(layout, "fcmoe").aggregate(glob, updates)
    everywhere = [[1] * layout.num_experts] * layout.num_layers
    assert factor.diagnostics["conflicts"] == everywhere  # the gauge-flipped client is flagged on every expert
    assert product.diagnostics["conflicts"] == [[0] * layout.num_experts] * layout.num_layers
    assert min(product.diagnostics["mean_cosine_per_layer"]) > 0.99
    assert max(factor.diagnostics["mean_cosine_per_layer"]) < 0.99
    with pytest.raises(ValueError, match="conflict_space"):
        AggregationHub(layout, "fcmoe", conflict_space="factor", lowrank="exact")
    with pytest.raises(ValueError, match="conflict_space"):
        AggregationHub(layout, "fcmoe", conflict_space="gauge")


def test_module_granularity_flags_a_conflict_the_whole_expert_hides(layout):
    """A client agrees strongly on gate_up and disagrees mildly on down: per expert its inner product with the
    consensus is positive, per module (LoRA pair) the down projection conflicts."""
    glob = make_state(layout, 0)
    step = make_state(layout, 1, 0.02)
    pairs = layout.by_kind("expert")
    big = max(pairs, key=lambda p: p.out_features)  # gate_up (2 * intermediate rows)
    small = [p for p in pairs if p.out_features != big.out_features]
    updates = []
    for i in range(4):
        noise = make_state(layout, 20 + i, 1e-4)
        state = dict(glob)
        for p in pairs:
            factor = 1.0
            if i == 3:
                factor = 3.0 if p.out_features == big.out_features else -0.3
            state[p.b_key] = glob[p.b_key] + factor * step[p.b_key] + noise[p.b_key]
        updates.append(ClientUpdate(f"c{i}", state, num_examples=10))
    assert small
    expert = AggregationHub(layout, "fcmoe").aggregate(glob, updates)
    module = AggregationHub(layout, "fcmoe", conflict_granularity="module").aggregate(glob, updates)
    assert expert.diagnostics["conflict_rate"] == 0.0
    assert module.diagnostics["conflicts"] == [[1] * layout.num_experts] * layout.num_layers
    residual = module.residuals["c3"]
    assert all(residual[p.b_key].any() for p in small)  # only the conflicting module is retained
    assert not any(residual[p.b_key].any() for p in pairs if p.out_features == big.out_features)


def test_deviation_retention_with_lambda_one_keeps_the_clients_own_experts(layout):
    glob = make_state(layout, 0)
    updates = [ClientUpdate(f"c{i}", make_state(layout, 30 + i), num_examples=5 + i) for i in range(3)]
    hub = AggregationHub(layout, "fcmoe", retention_target="deviation", retention_lambda=1.0, server_lr=0.8)
    result = hub.aggregate(glob, updates)
    expert_keys = {k for p in layout.by_kind("expert") for k in (p.a_key, p.b_key)}
    for update in updates:
        personal = result.personalized[update.client_id]
        for key in glob:
            want = update.state[key] if key in expert_keys else result.global_state[key]
            torch.testing.assert_close(personal[key], want, rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="retention_target"):
        AggregationHub(layout, "fcmoe", retention_target="everything")
