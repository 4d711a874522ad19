"""A Flower node publishes its own personalized adapter: `hf-fcmoe push <state-dir>` on the node.

The node's state-dir is written by the node's own code in-process (the ClientApp's evaluate handler answering the
strategy's real evaluate message, with a residual), then pushed with the node's token to the loopback Hub
(tests/hub_server) and loaded back with stock `PeftModel.from_pretrained` in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402

from tests.hub_server import HubServer  # noqa: E402
from tests.test_hub import TOKEN, hub_env, run_cli  # noqa: E402

LOADER = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from huggingface_hub import list_repo_files
spec = json.load(open(sys.argv[1]))
probe = torch.tensor([[5, 17, 42, 99, 120, 7, 64, 33]])
def logits(base, adapter):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(probe).logits
hub = logits(spec["base_repo"], spec["repo"])
local = logits(spec["local_base"], spec["local_adapter"])
json.dump({"max_diff": float((hub - local).abs().max()), "files": sorted(list_repo_files(spec["repo"])),
           "moved": float((hub - logits(spec["local_base"], spec["local_global"])).abs().max())},
          open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub"), token=TOKEN).start()
    yield server
    server.stop()


def _identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 2), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def node_state(tmp_path, tiny_run_config, monkeypatch):
    """A node's state-dir after one evaluate message that brought a global adapter and the node's residual."""
    from hf_fcmoe.aggregation import AggregationResult
    from hf_fcmoe.federation.flower.client_app import evaluate
    from hf_fcmoe.federation.flower.export_data import export_client_data
    from hf_fcmoe.federation.flower.server_app import FlowerFederation
    from hf_fcmoe.federation.flower.strategy import RoundOutcome
    from hf_fcmoe.federation.run_dir import save_adapter_folder

    _identity(monkeypatch)
    config = tiny_run_config(engine="flower", aggregation_method="fcmoe", num_clients=1)
    folder = export_client_data(config, tmp_path / "data")["client_000"]
    federation = FlowerFederation(config, min_nodes=1)
    strategy = federation._strategy(["client_000"], "runkey")
    strategy.nodes = {"client_000": 7}
    generator = torch.Generator().manual_seed(3)
    initial = federation.initial_state
    global_state = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in initial.items()}
    residual = {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in global_state.items()}
    strategy.global_state = global_state
    strategy.outcome = RoundOutcome(AggregationResult(global_state, residuals={"client_000": residual}), [])
    (message,) = strategy.configure_evaluate(1, None, ConfigRecord(), None)
    message.metadata.__dict__["_message_id"] = message.object_id
    state_dir = tmp_path / "node_state"
    node_config = {
        "client-id": "client_000",
        "train-data": str(folder / "train.jsonl"),
        "eval-data": str(folder / "eval.jsonl"),
        "state-dir": str(state_dir),
    }
    reply = evaluate(message, Context(1, 7, node_config, RecordDict(), {}))
    assert "scores" in reply.content, reply.content
    save_adapter_folder(tmp_path / "global", global_state, federation.lora_config)  # for the comparison only
    return state_dir, tmp_path / "global"


def test_a_node_pushes_only_its_own_personalized_adapter(node_state, hub, tmp_path):
    state_dir, global_dir = node_state
    env = hub_env(hub, tmp_path / "home")
    args = [str(state_dir), "--repo_id", "org/fed-client_000", "--global_repo_id", "org/fed", "--yes"]
    proc = run_cli(["push", *args], env)
    assert proc.returncode == 0, proc.stderr
    assert "org/fed-client_000@main: personalized adapter of client_000" in proc.stdout
    assert "org/fed-base@main: base model" in proc.stdout and "global adapter" not in proc.stdout
    run_dir = state_dir / "runs" / "runkey"
    spec = {
        "repo": "org/fed-client_000",
        "base_repo": "org/fed-base",
        "local_base": str(state_dir / "base_model"),
        "local_adapter": str(run_dir / "personalized"),
        "local_global": str(global_dir),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    loaded = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["max_diff"] == 0.0  # the pushed adapter is the node's, bit for bit
    assert out["moved"] > 1e-4  # ... and it is the personalized one, not the global
    assert "adapter_model.safetensors" in out["files"] and "README.md" in out["files"]
    assert not any(name.endswith(("residual-1.safetensors", "round.json", "metrics.jsonl")) for name in out["files"])
    # the card names the global repo and the base, and nothing pushed carries a local path
    pushed = _pushed_texts(env, tmp_path)
    assert "org/fed" in pushed["README.md"] and "org/fed-base" in pushed["README.md"]
    assert "client_000" in pushed["README.md"]
    for name, text in pushed.items():
        assert str(tmp_path) not in text, name
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] == "org/fed-base"
    # pushed again unchanged: no commit
    again = run_cli(["push", *args], env)
    assert again.returncode == 0 and "0 commit(s)" in again.stdout, again.stdout + again.stderr
    # bad input: one line, before any network call
    proc = run_cli(["push", str(state_dir), "--repo_id", "org/x", "--clients", "all", "--yes"], env)
    assert proc.returncode == 2 and "--clients: for a server run directory" in proc.stderr
    proc = run_cli(["push", str(state_dir), "--repo_id", "org/x", "--yes"], env)
    assert proc.returncode == 2 and "needs --global_repo_id" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _pushed_texts(env: dict, tmp_path) -> dict[str, str]:
    script = (
        "import json, sys\n"
        "from huggingface_hub import hf_hub_download, list_repo_files\n"
        "repo = 'org/fed-client_000'\n"
        "texts = {f: open(hf_hub_download(repo, f)).read() for f in list_repo_files(repo) "
        "if f.endswith(('.json', '.md', '.txt', '.jinja'))}\n"
        "json.dump(texts, open(sys.argv[1], 'w'))\n"
    )
    out = tmp_path / "texts.json"
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_the_train_handler_reply_passes_the_hubs_checks_with_dp_applied_on_the_node(
    tmp_path, tiny_run_config, monkeypatch
):
    """In-process: the strategy's train message, the node's train handler, the strategy's decoding. The update
    carries the round's fingerprint the hub checks, the node was enrolled with its size, and the recipe's
    client-side DP noise was added on the node before the update left it."""
    from flwr.app import MetricRecord

    from hf_fcmoe.federation.flower.client_app import train
    from hf_fcmoe.federation.flower.export_data import export_client_data
    from hf_fcmoe.federation.flower.server_app import FlowerFederation

    _identity(monkeypatch)
    config = tiny_run_config(engine="flower", num_clients=1, max_steps=2, dp_noise_multiplier=0.5, dp_clip_norm=1.0)
    folder = export_client_data(config, tmp_path / "data")["client_000"]
    federation = FlowerFederation(config, min_nodes=1)
    strategy = federation._strategy(["client_000"], "runkey")
    strategy.nodes = {"client_000": 7}
    rows = len((folder / "train.jsonl").read_text().splitlines())
    assert federation._enroll("client_000", RecordDict({"data": MetricRecord({"train_rows": rows})})) is None
    strategy.global_state = global_state = federation.initial_state
    (message,) = strategy.configure_train(1, None, ConfigRecord(), None)
    message.metadata.__dict__["_message_id"] = message.object_id
    node_config = {
        "client-id": "client_000",
        "train-data": str(folder / "train.jsonl"),
        "eval-data": str(folder / "eval.jsonl"),
        "state-dir": str(tmp_path / "node_state"),
    }
    reply = train(message, Context(1, 7, node_config, RecordDict(), {}))
    assert "rejected" not in reply.content, reply.content
    assert reply.content["client"]["update_fingerprint"] == federation.hub.fingerprint(1)
    strategy.aggregate_train(1, [reply])
    assert strategy.outcome.rejected == {} and [u.client_id for u in strategy.outcome.updates] == ["client_000"]
    (update,) = strategy.outcome.updates
    # noise of std 0.5 * clip on every coordinate: far above what 2 steps of training move
    delta = torch.cat([(update.state[k].float() - global_state[k].float()).flatten() for k in global_state])
    assert delta.norm() > 0.25 * delta.numel() ** 0.5
    federation.hub.declared_sizes["client_000"] = 1  # a claim above the enrolled size is refused by the hub
    result = federation.hub.aggregate(global_state, [update], round=1)
    assert "exceeds its declared size 1" in result.diagnostics["rejected"]["client_000"]
    federation.hub.declared_sizes["client_000"] = rows
    replayed = federation.hub.aggregate(global_state, [update], round=2)  # round 1's update sent again in round 2
    assert "fingerprint does not match" in replayed.diagnostics["rejected"]["client_000"]
