"""Robust aggregation (per-expert median norm clipping, Multi-Krum, coordinate median) and the reliability
plumbing around the hub: pickle-free hub state, round manifests, client faults, client-side DP."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_fcmoe.aggregation import AggregationHub, ClientUpdate
from hf_fcmoe.aggregation.robust import clip_scales, coordinate_aggregate
from tests.conftest import make_state, tiny_mixtral_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layout():
    return tiny_mixtral_layout()


def honest(layout, glob, num=4, seed=1):
    """Clients sharing a common direction plus a little noise (a consensus step the attacker can spoil)."""
    gen = torch.Generator().manual_seed(seed)
    common = {k: torch.randn(v.shape, generator=gen) for k, v in glob.items()}
    out = []
    for i in range(num):
        state = {k: v + 0.01 * (common[k] + 0.3 * torch.randn(v.shape, generator=gen)) for k, v in glob.items()}
        counts = torch.randint(1, 9, (layout.num_layers, layout.num_experts), generator=gen)
        out.append(ClientUpdate(f"honest{i}", state, 10, counts))
    return out


def attacker(glob, update, transform):
    state = {k: glob[k] + transform(update.state[k] - glob[k]) for k in glob}
    return ClientUpdate("attacker", state, update.num_examples, update.expert_counts)


def step(glob, state):
    return torch.sqrt(sum((state[k] - glob[k]).double().square().sum() for k in glob))


@pytest.mark.parametrize(
    ("name", "transform"),
    [("scale1e6", lambda d: 1e6 * d), ("reset", None), ("signflip", lambda d: -d), ("noise", "noise")],
)
def test_fcmoe_default_bounds_an_attackers_step(layout, name, transform):
    """The issue's attacks: with clipping the step stays near the honest one; without it (1e6) it explodes."""
    glob = make_state(layout, 0)
    good = honest(layout, glob)
    if transform is None:  # an all-zero state: a reset
        bad = ClientUpdate("attacker", {k: torch.zeros_like(v) for k, v in glob.items()}, 10, good[0].expert_counts)
    elif transform == "noise":
        gen = torch.Generator().manual_seed(5)
        bad = attacker(glob, good[0], lambda d: 100 * torch.randn(d.shape, generator=gen) * d.std())
    else:
        bad = attacker(glob, good[0], transform)
    clean = step(glob, AggregationHub(layout, "fcmoe").aggregate(glob, good).global_state)
    result = AggregationHub(layout, "fcmoe").aggregate(glob, [*good, bad])
    assert step(glob, result.global_state) < 1.6 * clean, name
    if name != "signflip":  # the sign-flipped update has an honest norm: nothing to clip
        assert result.diagnostics["clipped"].get("attacker", 0) > 0
    if name == "scale1e6":
        unclipped = AggregationHub(layout, "fcmoe", norm_clip=None).aggregate(glob, [*good, bad])
        assert step(glob, unclipped.global_state) > 1e4 * clean


def test_clipping_without_outliers_changes_nothing(layout):
    glob = make_state(layout, 0)
    good = honest(layout, glob)
    clipped = AggregationHub(layout, "fcmoe").aggregate(glob, good)
    assert clipped.diagnostics["clipped"] == {}
    plain = AggregationHub(layout, "fcmoe", norm_clip=None).aggregate(glob, good)
    for key in glob:
        assert torch.equal(clipped.global_state[key], plain.global_state[key]), key


@pytest.mark.parametrize("method", ["fedavg", "fedmoe", "fedgh", "ties", "fedadam"])
def test_norm_clip_is_available_to_every_method(layout, method):
    glob = make_state(layout, 0)
    good = honest(layout, glob)
    bad = attacker(glob, good[0], lambda d: 1e4 * d)
    lr = {"server_lr": 1e-2} if method == "fedadam" else {}
    clipped = AggregationHub(layout, method, norm_clip=2.0, **lr).aggregate(glob, [*good, bad])
    plain = AggregationHub(layout, method, **lr).aggregate(glob, [*good, bad])
    assert clipped.diagnostics["clipped"]["attacker"] > 0
    assert step(glob, clipped.global_state) < step(glob, plain.global_state)


def test_clip_scales_bound_each_block_at_factor_times_the_active_median():
    norms = torch.tensor([[1.0, 2.0, 3.0, 100.0], [0.0, 0.0, 0.0, 5.0]], dtype=torch.float64)
    active = torch.tensor([[True, True, True, True], [True, True, True, False]])
    scales = clip_scales(norms, active, 2.0)
    torch.testing.assert_close(scales[0], torch.tensor([1.0, 1.0, 1.0, 0.04], dtype=torch.float64))
    assert torch.equal(scales[1], torch.ones(4, dtype=torch.float64))  # a zero median clips nothing


def test_krum_drops_the_attacker_and_keeps_the_rest_bitwise(layout):
    glob = make_state(layout, 0)
    good = honest(layout, glob)
    bad = attacker(glob, good[0], lambda d: 50 * d)
    result = AggregationHub(layout, "fcmoe", robust_aggregator="krum").aggregate(glob, [*good, bad])
    assert list(result.diagnostics["krum_excluded"]) == ["attacker"]
    clean = AggregationHub(layout, "fcmoe").aggregate(glob, good)
    for key in glob:
        assert torch.equal(result.global_state[key], clean.global_state[key]), key
    few = AggregationHub(layout, "fcmoe", robust_aggregator="krum").aggregate(glob, good[:3])
    assert "none dropped" in few.diagnostics["krum_note"]


def test_median_and_trimmed_mean(layout):
    values = [
        torch.tensor([1.0, -5.0]),
        torch.tensor([2.0, 0.0]),
        torch.tensor([100.0, 1.0]),
        torch.tensor([3.0, 2.0]),
    ]
    assert torch.equal(coordinate_aggregate(values, "median"), torch.tensor([2.5, 0.5]))
    assert torch.equal(coordinate_aggregate(values, "trimmed_mean", 0.25), torch.tensor([2.5, 0.5]))
    glob = make_state(layout, 0)
    good = honest(layout, glob, num=4)
    bad = attacker(glob, good[0], lambda d: 1e6 * d)
    robust = AggregationHub(layout, "fedavg", robust_aggregator="median").aggregate(glob, [*good, bad])
    clean = AggregationHub(layout, "fedavg").aggregate(glob, good)
    assert step(glob, robust.global_state) < 2 * step(glob, clean.global_state)


def test_robust_options_are_validated(layout):
    with pytest.raises(ValueError, match="fedavg/fedprox only"):
        AggregationHub(layout, "fcmoe", robust_aggregator="median")
    with pytest.raises(ValueError, match="norm_clip"):
        AggregationHub(layout, "fedavg", norm_clip=-1)
    with pytest.raises(ValueError, match="robust_aggregator"):
        AggregationHub(layout, "fedavg", robust_aggregator="mean")
    with pytest.raises(TypeError, match="norm_clip"):
        AggregationHub(layout, "local", norm_clip=2.0)


# ----------------------------------------------------------------- files: no pickle, manifests
def test_hub_state_round_trips_through_safetensors_and_json(tmp_path):
    from hf_fcmoe.federation.checkpoint_io import load_hub_state, save_hub_state

    state = {
        "method": "fedadam",
        "server_opt": {"steps": 3, "m": {"a.b": torch.ones(2, 3)}, "v": {"a.b": torch.zeros(2)}},
    }
    save_hub_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub_state.json", "hub_state.safetensors"]
    loaded = load_hub_state(tmp_path)
    assert loaded["method"] == "fedadam" and loaded["server_opt"]["steps"] == 3
    assert torch.equal(loaded["server_opt"]["m"]["a.b"], torch.ones(2, 3))
    assert load_hub_state(tmp_path / "missing") is None


def test_manifest_detects_partial_altered_and_extra_files(tmp_path):
    from hf_fcmoe.federation.checkpoint_io import last_intact_round, manifest_problem, write_manifest

    for index in range(3):
        folder = tmp_path / str(index)
        (folder / "global").mkdir(parents=True)
        (folder / "global" / "adapter_model.safetensors").write_bytes(bytes(range(index + 5)))
        write_manifest(folder)
        assert manifest_problem(folder) is None
    (tmp_path / "2" / "global" / "adapter_model.safetensors").write_bytes(b"flipped!")
    assert "sha256" in manifest_problem(tmp_path / "2")
    assert last_intact_round(tmp_path, 2)[0] == 1
    (tmp_path / "1" / "extra.txt").write_text("x")
    assert "differ" in manifest_problem(tmp_path / "1")
    (tmp_path / "0" / "manifest.json").unlink()
    assert last_intact_round(tmp_path, 2) == (None, [manifest_problem(tmp_path / str(i)) for i in (2, 1, 0)])


def test_package_never_unpickles_or_trusts_remote_code():
    pattern = re.compile(r"torch\.load\(|pickle\.load|import pickle|trust_remote_code\s*=\s*True")
    offenders = [str(p) for p in (ROOT / "hf_fcmoe").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


# ----------------------------------------------------------------- client faults
def fault_config(**overrides):
    values = dict(client_round_timeout=None, min_clients_per_round=2, on_too_few_clients="stop", round_retries=2)
    return SimpleNamespace(**{**values, **overrides})


def test_failed_clients_are_dropped_with_reasons():
    from hf_fcmoe.federation.faults import collect_round

    def train(cid, callbacks):
        if cid == "raises":
            raise RuntimeError("CUDA out of memory")
        if cid == "silent":
            return None
        if cid == "slow":
            deadline = callbacks[0]
            deadline.started -= 10  # as if 10 s had passed at the first step end
            control = SimpleNamespace(should_training_stop=False)
            deadline.on_step_end(None, None, control)
            assert control.should_training_stop
        return ClientUpdate(cid, {}, 1)

    updates, dropped = collect_round(
        ["a", "raises", "silent", "slow", "b"], train, 1, fault_config(client_round_timeout=5.0)
    )
    assert [u.client_id for u in updates] == ["a", "b"]
    assert "RuntimeError: CUDA out of memory" in dropped["raises"]
    assert dropped["silent"] == "returned no update"
    assert "time limit of 5 s" in dropped["slow"]


def test_too_few_clients_retry_then_stop():
    from hf_fcmoe.federation.faults import RoundFailed, collect_round

    calls = {"flaky": 0}  # flaky fails twice, then works

    def train(cid, callbacks):
        if cid == "flaky":
            calls["flaky"] += 1
            if calls["flaky"] < 3:
                raise TimeoutError("lost connection")
        if cid == "dead":
            raise RuntimeError("gone")
        return ClientUpdate(cid, {}, 1)

    updates, dropped = collect_round(["ok", "flaky", "dead"], train, 4, fault_config(on_too_few_clients="retry"))
    assert [u.client_id for u in updates] == ["ok", "flaky"] and calls["flaky"] == 3 and list(dropped) == ["dead"]
    calls["flaky"] = 0  # "stop": no second chance
    with pytest.raises(RoundFailed, match="round 4: only 1 of 3 clients.*min_clients_per_round=2"):
        collect_round(["ok", "dead", "flaky"], train, 4, fault_config())


def test_reliability_fields_are_validated(tiny_run_config):
    with pytest.raises(ValueError, match="min_clients_per_round"):
        tiny_run_config(min_clients_per_round=9)
    with pytest.raises(ValueError, match="on_too_few_clients"):
        tiny_run_config(on_too_few_clients="pray")
    with pytest.raises(ValueError, match="dp_noise_multiplier"):
        tiny_run_config(dp_noise_multiplier=0)


def test_routed_token_bound_counts_batches_times_length_times_top_k(tiny_run_config):
    from hf_fcmoe.federation.faults import routed_token_bound

    config = tiny_run_config()  # max_steps 4, batch 8, max_length 48
    assert routed_token_bound(config, 100, top_k=2) == 4 * 8 * 48 * 2
    assert routed_token_bound(config, 100, top_k=2, world_size=2) == 2 * 4 * 8 * 48 * 2


# ----------------------------------------------------------------- client-side DP
def test_privatize_clips_and_adds_seeded_noise():
    from hf_fcmoe.federation.privacy import privatize_update

    glob = {"w": torch.zeros(1000)}
    update = ClientUpdate("c", {"w": torch.full((1000,), 0.1)}, 5)  # norm 3.16
    quiet = privatize_update(update, glob, clip_norm=1.0, noise_multiplier=1e-12, seed=0)
    torch.testing.assert_close(quiet.state["w"].norm(), torch.tensor(1.0))
    noisy = privatize_update(update, glob, clip_norm=1.0, noise_multiplier=0.5, seed=0)
    again = privatize_update(update, glob, clip_norm=1.0, noise_multiplier=0.5, seed=0)
    assert torch.equal(noisy.state["w"], again.state["w"])
    noise = noisy.state["w"] - quiet.state["w"]
    assert 0.45 < float(noise.std()) < 0.55 and noisy.metrics["dp_update_norm"] == pytest.approx(10**0.5)


def test_epsilon_comes_from_opacus_rdp_and_grows_with_rounds():
    pytest.importorskip("opacus")
    from hf_fcmoe.federation.privacy import epsilon

    one, five = epsilon(1.0, 1, 1e-5), epsilon(1.0, 5, 1e-5)
    assert 3 < one < five < 5 * one and epsilon(10.0, 5, 1e-5) < 1
    from hf_fcmoe.federation.safeguards import dp_metrics

    config = SimpleNamespace(dp_noise_multiplier=1.0, dp_delta=1e-5)
    row = dp_metrics(config, lambda t: ["a", "b"] if t % 2 else ["a"], 5)
    assert row["dp_epsilon"] == pytest.approx(five) and row["dp_epsilon_round"] == pytest.approx(one)
    json.dumps(row)


# ----------------------------------------------------------------- end to end in the simulation
def test_simulation_drops_a_crashing_client_and_reports_dp_epsilon(tiny_run_config):
    """One tiny run: a client whose local round raises is dropped with its reason, the others aggregate under
    client-side DP, and metrics carry epsilon; the hub state is never pickled."""
    pytest.importorskip("opacus")
    from hf_fcmoe.federation.simulation import FederatedSimulation

    config = tiny_run_config("faulty", num_rounds=1, dp_noise_multiplier=1.0, dp_clip_norm=1.0)
    simulation = FederatedSimulation(config, progress=False)
    real_train = simulation.worker.train

    def train(client_id, *args, **kwargs):
        if client_id == "client_001":
            raise RuntimeError("disk full")
        return real_train(client_id, *args, **kwargs)

    simulation.worker.train = train
    result = simulation.run()
    row = result.metrics[-1]
    assert row["dropped"] == {"client_001": "local round raised RuntimeError: disk full"}
    assert row["clients"] == ["client_000", "client_002"] and row["rejected"] == {}
    assert row["dp_epsilon"] == pytest.approx(row["dp_epsilon_round"]) and row["dp_epsilon"] > 0
    round_dir = result.output_dir / "rounds" / "1"
    assert (round_dir / "manifest.json").exists() and not list(round_dir.rglob("*.pt"))
    assert simulation.hub.declared_sizes.keys() == {"client_000", "client_001", "client_002"}
