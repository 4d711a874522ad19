"""A real Flower deployment on loopback (flower-superlink + 3 flower-supernode + `flwr run`), no Ray.

The same tiny FC-MoE recipe runs in-process (`run_simulation`) and on Flower; the global adapters agree,
personalized adapters and residuals exist only under each node's own state-dir, a server killed after
round 1 resumes to the same final global, and a SuperNode killed mid-round is named and rejoins with its
residual. Every process started is killed by PID at the end (fixture finalizer), also on failure.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr")

from hf_fcmoe.config import load_config  # noqa: E402
from hf_fcmoe.federation.flower.export_data import export_client_data, node_config  # noqa: E402
from hf_fcmoe.federation.run_dir import load_adapter_weights  # noqa: E402
from hf_fcmoe.federation.simulation import run_simulation  # noqa: E402
from tests.conftest import TINY_RUN  # noqa: E402
from tests.flower_loopback import LoopbackFederation, _kill, cmdline  # noqa: E402

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 900
RECIPE = {**TINY_RUN, "aggregation_method": "fcmoe", "engine": "flower"}


def _assert_states_close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flower")


@pytest.fixture(scope="module")
def recipes(work):
    paths = {}
    for name, rounds in (("two", 2), ("three", 3)):
        path = work / f"recipe_{name}.yaml"
        path.write_text(yaml.safe_dump({**RECIPE, "num_rounds": rounds, "output_dir": str(work / "unused")}))
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def deployment(work, recipes):
    folders = export_client_data(load_config(recipes["two"]), work / "data")
    configs = [node_config(cid, folder, work / "state" / cid) for cid, folder in folders.items()]
    federation = LoopbackFederation(work, configs)
    try:
        yield federation.start()
    finally:
        federation.stop()
        assert federation.survivors() == [], "processes survived the deployment"


@pytest.fixture(scope="module")
def in_process(work, recipes):
    values = {**yaml.safe_load(recipes["two"].read_text()), "engine": "simulation", "output_dir": str(work / "sim")}
    return run_simulation(load_config(overrides=values), progress=False)


def _run(deployment, recipe: Path, output_dir: Path, name: str, extra: str = ""):
    return deployment.submit(
        f"recipe='{recipe}' output-dir='{output_dir}' wait-timeout=300 round-timeout=600 {extra}".strip(), name
    )


def _finish(deployment, proc, name: str) -> None:
    code = proc.wait(timeout=RUN_TIMEOUT_S)
    assert code == 0, deployment.log(f"flwr-{name}")[-4000:]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.5)


def _last_round(output_dir: Path) -> int:
    state = output_dir / "state.json"
    return json.loads(state.read_text())["last_round"] if state.exists() else -1


def test_loopback_deployment_matches_the_in_process_engine(deployment, recipes, in_process, work):
    out = work / "flower_run"
    _finish(deployment, _run(deployment, recipes["two"], out, "plain"), "plain")
    for round_index in range(3):
        _assert_states_close(
            load_adapter_weights(out / "rounds" / str(round_index) / "global"),
            load_adapter_weights(in_process.output_dir / "rounds" / str(round_index) / "global"),
        )
    _assert_states_close(load_adapter_weights(out / "global"), load_adapter_weights(in_process.global_dir))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row, expected in zip(rows, in_process.metrics):
        assert row["global_eval_loss"] == pytest.approx(expected["global_eval_loss"], rel=1e-5)
        assert row["local_eval_loss_per_client"] == pytest.approx(expected["local_eval_loss_per_client"], rel=1e-5)
    assert rows[1]["clients"] == ["client_000", "client_001", "client_002"] and rows[1]["bytes_up"] > 0
    stats = json.loads((out / "rounds" / "1" / "clients" / "client_001" / "stats.json").read_text())
    assert stats["num_examples"] > 0 and len(stats["expert_counts"]) == 2
    # what stays on the node stays on the node
    assert not (out / "personalized").exists()
    assert not list(out.glob("rounds/*/residuals"))
    run_key = json.loads((out / "federation.json").read_text())["run_key"]
    for cid in ("client_000", "client_001", "client_002"):
        node_dir = work / "state" / cid / "runs" / run_key
        assert sorted(p.name for p in node_dir.glob("residual-*.safetensors")) == [
            "residual-1.safetensors",
            "residual-2.safetensors",
        ]
        _assert_states_close(
            load_adapter_weights(node_dir / "personalized"), load_adapter_weights(in_process.personalized_dirs[cid])
        )
    personalized = sorted(p.relative_to(work) for p in work.rglob("personalized") if run_key in str(p))
    assert personalized == [
        Path(f"state/{cid}/runs/{run_key}/personalized") for cid in sorted(in_process.personalized_dirs)
    ]


def test_server_killed_after_round_1_resumes_to_the_same_global(deployment, recipes, in_process, work):
    out = work / "resumed_run"
    first = _run(deployment, recipes["two"], out, "killed")
    _wait_for(lambda: _last_round(out) >= 1, RUN_TIMEOUT_S, "round 1 of the run to be killed")
    servers = [pid for pid in deployment._ours() if "flwr-serverapp" in cmdline(pid)]
    assert servers, "no flwr-serverapp process found"
    for pid in servers:
        _kill(pid)
    _kill(first.pid)
    first.wait(timeout=30)
    assert _last_round(out) == 1
    _finish(deployment, _run(deployment, recipes["two"], out, "resume", "resume=true"), "resume")
    _assert_states_close(load_adapter_weights(out / "global"), load_adapter_weights(in_process.global_dir))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]


def test_killed_supernode_is_named_and_rejoins_with_its_residual(deployment, recipes, work):
    out = work / "node_killed_run"
    proc = _run(deployment, recipes["three"], out, "nodekill")
    _wait_for(lambda: _last_round(out) >= 1, RUN_TIMEOUT_S, "round 1")
    run_key = json.loads((out / "federation.json").read_text())["run_key"]
    residual = work / "state" / "client_002" / "runs" / run_key / "residual-1.safetensors"
    before = hashlib.sha256(residual.read_bytes()).hexdigest()
    deployment.kill_node(2)  # client_002, while round 2 trains
    deployment.start_node(2)  # it comes back (a new node id) and must rejoin for round 3
    _finish(deployment, proc, "nodekill")
    rows = {row["round"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert "client_002" in rows[2].get("missing", {}), rows[2]
    assert rows[2]["clients"] == ["client_000", "client_001"]
    assert rows[3]["clients"] == ["client_000", "client_001", "client_002"]
    assert hashlib.sha256(residual.read_bytes()).hexdigest() == before
    assert (residual.parent / "residual-3.safetensors").exists()


def test_lambda_per_client_is_chosen_on_the_node_as_in_process(deployment, work):
    """retention_lambda_grid on Flower: each node chooses on its own held-out rows, keeps its choice for its next
    round, and reports it; the run's lambdas, metrics and personalized adapters equal the in-process engine's."""
    grid = {"retention_lambda_grid": [0.0, 0.5, 1.0], "aggregation_options": {"retention_target": "deviation"}}
    recipe = work / "recipe_lambda.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, **grid, "num_rounds": 2, "output_dir": str(work / "unused")}))
    values = {**yaml.safe_load(recipe.read_text()), "engine": "simulation", "output_dir": str(work / "sim_lambda")}
    expected = run_simulation(load_config(overrides=values), progress=False)
    out = work / "flower_lambda"
    _finish(deployment, _run(deployment, recipe, out, "lambda"), "lambda")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row, reference in zip(rows[1:], expected.metrics[1:], strict=True):
        assert row["retention_lambda_per_client"] == reference["retention_lambda_per_client"]
        for cid, losses in reference["retention_lambda_validation_loss"].items():
            assert row["retention_lambda_validation_loss"][cid] == pytest.approx(losses, rel=1e-5)
        assert row["local_eval_loss_per_client"] == pytest.approx(reference["local_eval_loss_per_client"], rel=1e-5)
    run_key = json.loads((out / "federation.json").read_text())["run_key"]
    for cid in ("client_000", "client_001", "client_002"):
        node_dir = work / "state" / cid / "runs" / run_key
        assert json.loads((node_dir / "retention_lambdas.json").read_text()) == {
            str(row["round"]): row["retention_lambda_per_client"][cid] for row in expected.metrics[1:]
        }
        _assert_states_close(
            load_adapter_weights(node_dir / "personalized"), load_adapter_weights(expected.personalized_dirs[cid])
        )


def _readme_commands(marker: str) -> str:
    """The README's bash block that contains `marker` (the test runs the documented commands themselves)."""
    text = (Path(__file__).resolve().parents[1] / "recipes" / "flower" / "README.md").read_text()
    blocks = [block.split("\n", 1)[1] for block in text.split("```bash")[1:]]
    block = next(block.split("```", 1)[0] for block in blocks if marker in block)
    return "\n".join(line.strip() for line in block.splitlines())


def _readme_line(marker: str) -> str:
    """The one command line of the README that contains `marker` (without its trailing comment)."""
    line = next(line for line in _readme_commands(marker).splitlines() if marker in line)
    return line.split("  #", 1)[0].strip()


def test_deployment_with_tls_and_supernode_auth_as_the_readme_says(tmp_path, tiny_run_config):
    import subprocess

    subprocess.run(
        ["bash", "-euc", _readme_commands("openssl req -x509")], cwd=tmp_path, check=True, capture_output=True
    )
    subprocess.run(["bash", "-euc", _readme_line("ssh-keygen")], cwd=tmp_path, check=True, capture_output=True)
    values = {**RECIPE, "num_clients": 1, "num_rounds": 1, "max_steps": 2, "output_dir": str(tmp_path / "unused")}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    folder = export_client_data(load_config(recipe), tmp_path / "data")["client_000"]
    nodes = [node_config("org_a", folder, tmp_path / "state" / "org_a")]
    federation = LoopbackFederation(tmp_path, nodes, certs=tmp_path / "certs", keys=[tmp_path / "keys" / "org_a"])
    try:
        federation.start()
        out = tmp_path / "server"
        _finish(federation, _run(federation, recipe, out, "tls"), "tls")
    finally:
        federation.stop()
        assert federation.survivors() == []
    assert (out / "global" / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients"] == ["org_a"]
    assert "insecure" not in (tmp_path / "home" / "operator" / "config.toml").read_text()
