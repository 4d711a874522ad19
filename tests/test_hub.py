"""Publishing to the Hub, end to end against a loopback Hub (tests/hub_server) and the real huggingface_hub client.

Pushes and loads run in fresh processes: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import, and the
test session itself runs offline. Nothing of huggingface_hub is patched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN
from tests.hub_server import HubServer

TOKEN = "hf_test_token"
REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ["client_000", "client_001"]
# a run whose clients conflict, so that personalized adapters differ from the global one
HUB_RUN = {
    **TINY_RUN,
    "aggregation_method": "fcmoe",
    "num_clients": 4,
    "dirichlet_alpha": 0.05,
    "max_steps": 12,
    "learning_rate": 0.03,
    # deviation retention: every client keeps a non-zero residual, so personalized adapters differ from the global
    "aggregation_options": {"leave_one_out": True, "retention_target": "deviation"},
    "lora_targets": ["experts", "router", "attention"],
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer(tmp_path_factory.mktemp("hub"), token=TOKEN).start()
    yield server
    server.stop()  # a yield fixture's teardown also runs when a test failed


def hub_env(server: HubServer, home: Path, token: str | None = TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        HF_ENDPOINT=server.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def run_cli(args: list[str], env: dict, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_fcmoe.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=stdin,
    )


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    from hf_fcmoe.config import load_config
    from hf_fcmoe.federation.simulation import run_simulation

    config = load_config(overrides={**HUB_RUN, "output_dir": str(tmp_path_factory.mktemp("fed") / "run")})
    return config, run_simulation(config, progress=False)


@pytest.fixture(scope="module")
def pushed(fed_run, hub, tmp_path_factory):
    config, result = fed_run
    home = tmp_path_factory.mktemp("home")
    before = tree_digest(result.output_dir)
    args = [str(result.output_dir), "--repo_id", "org/fed", "--clients", ",".join(CLIENTS), "--rounds", "all"]
    proc = run_cli(["push", *args, "--yes"], hub_env(hub, home))
    assert proc.returncode == 0, proc.stderr
    return {"args": args, "proc": proc, "before": before, "after": tree_digest(result.output_dir), "home": home}


@pytest.fixture(scope="module")
def loaded(fed_run, pushed, hub, tmp_path_factory):
    _, result = fed_run
    work = tmp_path_factory.mktemp("loader")
    spec = {
        "run_dir": str(result.output_dir),
        "repo_id": "org/fed",
        "base_repo_id": "org/fed-base",
        "clients": CLIENTS,
        "tags": ["round-1", "round-2"],
    }
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.hub_loader", str(work / "spec.json"), str(work / "out.json")],
        env=hub_env(hub, work / "home"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "out.json").read_text())


def test_push_layout_branches_tags_and_no_local_path(fed_run, pushed, hub):
    _, result = fed_run
    refs = hub.refs("org/fed")
    assert sorted(refs["branches"]) == ["client-client_000", "client-client_001", "main"]  # client_002/3 stay private
    assert sorted(refs["tags"]) == ["round-1", "round-2"]
    assert refs["tags"]["round-2"] == refs["branches"]["main"]
    assert [c["title"] for c in hub.commits("org/fed")][:3] == [
        "Global adapter, round 2",
        "Global adapter, round 1",
        "initial commit",
    ]
    assert hub.commits("org/fed", "client-client_000")[0]["title"] == "Personalized adapter of client_000, round 2"
    files = hub.commits("org/fed")[0]["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png"} <= set(files)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(
        hub.commits("org/fed-base")[0]["files"]
    )
    repo = hub.store.repo("org/fed")
    config = json.loads(repo.read(files["adapter_config.json"]))
    assert config["base_model_name_or_path"] == "org/fed-base"
    local_paths = [str(result.output_dir), str(result.output_dir.resolve()), "../base_model"]
    for commit in [*hub.commits("org/fed"), *hub.commits("org/fed", "client-client_000")]:
        for path, entry in commit["files"].items():
            if not entry.get("lfs"):
                text = repo.read(entry).decode()
                assert not any(p in text for p in local_paths), (path, "carries a local path")
    printed = pushed["proc"].stdout
    assert (
        "org/fed@client-client_000" in printed and "tag round-2" in printed and "adapter_model.safetensors" in printed
    )
    assert pushed["before"] == pushed["after"], "a push modified the local run directory"


def test_hub_adapters_reproduce_the_recorded_eval_losses(fed_run, loaded):
    _, result = fed_run
    rows = {row["round"]: row for row in result.metrics}
    for revision, round_index in [("main", 2), ("round-2", 2), ("round-1", 1)]:
        expected = rows[round_index]["global_eval_loss_per_client"]
        assert loaded["eval"][revision] == pytest.approx(expected, rel=1e-5), revision
        assert loaded["union"][revision] == pytest.approx(rows[round_index]["global_eval_loss"], rel=1e-5)
    for cid in CLIENTS:
        measured = loaded["eval"][f"client-{cid}"][cid]
        assert measured == pytest.approx(rows[2]["local_eval_loss_per_client"][cid], rel=1e-5), cid
    assert loaded["local_vs_hub_diff"] == 0.0


def test_several_adapters_in_one_base_each_reproduce_their_logits(loaded):
    assert loaded["pairwise_min_diff"] > 1e-4, "personalized adapters equal the global one: the test shows nothing"
    assert set(loaded["multi"]) == {"global", *CLIENTS}
    assert max(loaded["multi"].values()) < 1e-5


def test_transformers_load_adapter_route(loaded):
    """transformers' own route with PEFT 0.21.2: the default adapter loads right; named adapters cannot be switched
    (set_adapter demands PEFT >= 0.22), so README and cards send users to PeftModel. If this starts passing the
    named route, update both."""
    assert loaded["transformers_default_diff"] < 1e-5
    assert loaded["transformers_branch_diff"] < 1e-5  # one adapter, from a branch: adapter_kwargs={"revision": ...}
    assert "0.22" in loaded.get("transformers_named_error", ""), loaded.get("transformers_named_diff")
    readme = (REPO_ROOT / "README.md").read_text()
    assert "not supported" in readme and "set_adapter" in readme
    for template in ("global_adapter.md", "personalized_adapter.md"):
        assert "not supported" in (REPO_ROOT / "model_cards" / template).read_text()


def test_cards_carry_metadata_and_their_snippet_runs(loaded):
    for revision, card in loaded["cards"].items():
        assert card["base_model"] == "org/fed-base" and card["library_name"] == "peft", revision
        assert card["pipeline_tag"] == "text-generation" and card["license"] == "apache-2.0"
        assert {"federated-learning", "mixture-of-experts", "fc-moe", "fcmoe"} <= set(card["tags"])
        assert card["has_plot"]
        assert card["snippet_diff"] < 1e-5, f"the snippet of {revision}'s card loads other weights"
    assert "personalized" in loaded["cards"]["client-client_000"]["tags"]


def test_card_renders_training_details_and_metrics(fed_run, hub):
    repo = hub.store.repo("org/fed")
    text = repo.read(hub.commits("org/fed")[0]["files"]["README.md"]).decode()
    for expected in ["fcmoe", "| rounds | 2 |", "alpha 0.05", "retention lambda", "server step", "did **not** beat"]:
        assert expected in text, expected
    personal = repo.read(hub.commits("org/fed", "client-client_001")[0]["files"]["README.md"]).decode()
    row = fed_run[1].metrics[-1]
    assert f"{row['local_eval_loss_per_client']['client_001']:.4f}" in personal
    assert f"{row['global_eval_loss_per_client']['client_001']:.4f}" in personal


def test_repush_of_an_unchanged_run_makes_no_commit(fed_run, pushed, hub):
    heads = dict(hub.refs("org/fed")["branches"])
    base_head = hub.refs("org/fed-base")["branches"]["main"]
    proc = run_cli(["push", *pushed["args"], "--yes"], hub_env(hub, pushed["home"]))
    assert proc.returncode == 0, proc.stderr
    assert "0 commit(s)" in proc.stdout
    assert hub.refs("org/fed")["branches"] == heads and hub.refs("org/fed-base")["branches"]["main"] == base_head


@pytest.mark.slow
def test_one_more_round_is_one_commit_per_branch_and_one_tag(fed_run, hub, tmp_path):
    from hf_fcmoe.config import load_config
    from hf_fcmoe.federation.simulation import run_simulation

    _, result = fed_run
    copy = tmp_path / "grow"
    shutil.copytree(result.output_dir, copy)
    env = hub_env(hub, tmp_path / "home")
    args = ["push", str(copy), "--repo_id", "org/grow", "--clients", "all", "--yes"]
    assert run_cli(args, env).returncode == 0
    before = {branch: len(hub.commits("org/grow", branch)) for branch in hub.refs("org/grow")["branches"]}
    tags_before = set(hub.refs("org/grow")["tags"])
    base_head = hub.refs("org/grow-base")["branches"]["main"]
    run_simulation(load_config(overrides={**HUB_RUN, "output_dir": str(copy), "num_rounds": 3}), resume=True)
    proc = run_cli(args, env)
    assert proc.returncode == 0, proc.stderr
    after = {branch: len(hub.commits("org/grow", branch)) for branch in hub.refs("org/grow")["branches"]}
    assert set(after) == set(before) and len(after) == 5  # main + 4 client branches
    assert all(after[b] == before[b] + 1 for b in after), (before, after)
    assert set(hub.refs("org/grow")["tags"]) - tags_before == {"round-3"}
    assert hub.refs("org/grow-base")["branches"]["main"] == base_head  # unchanged base: no commit


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_input_fails_with_one_line_before_any_push(fed_run, hub, tmp_path):
    _, result = fed_run
    run = str(result.output_dir)
    env = hub_env(hub, tmp_path / "home")
    requests = len(hub.requests)
    one_line_error(run_cli(["push", run, "--repo_id", "not a repo", "--yes"], env), "invalid repo_id", "ORG/NAME")
    one_line_error(run_cli(["push", run, "--repo_id", "org/x", "--clients", "nobody", "--yes"], env), "nobody")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(result.output_dir, unfinished)
    shutil.rmtree(unfinished / "global")
    (unfinished / "state.json").write_text(json.dumps({"last_round": 1, "num_rounds": 2}))
    one_line_error(run_cli(["push", str(unfinished), "--repo_id", "org/x", "--yes"], env), "no finished global")
    one_line_error(run_cli(["push", str(tmp_path), "--repo_id", "org/x", "--yes"], env), "not a run directory")
    no_token = hub_env(hub, tmp_path / "empty_home", token=None)
    one_line_error(run_cli(["push", run, "--repo_id", "org/x", "--yes"], no_token), "no Hugging Face token")
    assert len(hub.requests) == requests, "bad input reached the Hub"
    one_line_error(run_cli(["push", run, "--repo_id", "org/x"], env), "--yes")  # no terminal to confirm on
    wrong = run_cli(["push", run, "--repo_id", "org/x", "--yes", "--token", "hf_wrong"], env)
    one_line_error(wrong, "refused the token (401)")


def test_transient_5xx_is_retried_and_the_push_completes(fed_run, hub, tmp_path):
    _, result = fed_run
    hub.fail("POST", r"/api/models/org/retry/commit/main", 503, times=2)
    hub.fail("POST", r"/api/models/org/retry/commit/client-client_000", 500, after=True)  # landed, answer lost
    args = ["push", str(result.output_dir), "--repo_id", "org/retry", "--clients", "client_000", "--private", "--yes"]
    proc = run_cli(args, hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "round-2" in hub.refs("org/retry")["tags"] and hub.store.repo("org/retry").meta["private"]
    titles = [c["title"] for c in hub.commits("org/retry", "client-client_000")]
    assert titles == ["Personalized adapter of client_000, round 2", "initial commit"]  # the retry made no duplicate


def test_failed_push_leaves_no_partial_adapter_and_a_rerun_completes(fed_run, hub, tmp_path):
    _, result = fed_run
    env = hub_env(hub, tmp_path)
    args = ["push", str(result.output_dir), "--repo_id", "org/cut", "--clients", ",".join(CLIENTS), "--yes"]
    hub.fail("POST", r"/api/models/org/cut/commit/main", 500, times=100)  # LFS uploaded, the commit never lands
    line = one_line_error(run_cli(args, env), "HTTP 500 after 5 attempts", "not pushed: org/cut@main")
    assert "pushed: org/cut-base@main" in line and "org/cut@client-client_001" in line.split("not pushed")[0]
    refs = hub.refs("org/cut")
    assert refs["tags"] == {}, "a tag points at an unpublished round"
    assert "adapter_model.safetensors" not in hub.commits("org/cut")[0]["files"]
    client_heads = {b: c for b, c in refs["branches"].items() if b != "main"}
    hub.faults.clear()
    uploads = sum(1 for method, _ in hub.requests if method == "PUT")
    proc = run_cli(args, env)
    assert proc.returncode == 0, proc.stderr
    assert (
        "adapter_model.safetensors" in hub.commits("org/cut")[0]["files"] and "round-2" in hub.refs("org/cut")["tags"]
    )
    assert {b: c for b, c in hub.refs("org/cut")["branches"].items() if b != "main"} == client_heads  # not redone
    assert sum(1 for method, _ in hub.requests if method == "PUT") == uploads  # LFS objects already uploaded


@pytest.mark.slow
def test_recipe_publishing_every_round_and_named_clients_only(hub, tmp_path):
    out = tmp_path / "recipe-run"
    overrides = {
        "output_dir": str(out),
        "num_rounds": 2,
        "max_steps": 2,
        "num_examples": 96,
        "num_clients": 2,
        "clients_per_round": 2,
        "push_to_hub": "true",
        "hub_model_id": "org/recipe",
        "hub_strategy": "every_save",
        "hub_push_clients": "[client_001]",
        "hub_private_repo": "true",
    }
    args = ["simulate", "--config", str(REPO_ROOT / "recipes/tiny/fedavg.yaml")]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    proc = run_cli(args, hub_env(hub, tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = hub.refs("org/recipe")
    assert sorted(refs["branches"]) == ["client-client_001", "main"] and sorted(refs["tags"]) == ["round-1", "round-2"]
    assert hub.store.repo("org/recipe").meta["private"]
    titles = [c["title"] for c in hub.commits("org/recipe")]
    assert titles == ["Global adapter, round 2", "Global adapter, round 1", "initial commit"]  # no local Trainer push
    assert not any("training_args" in path for _, path in hub.requests)
    assert f"hf-fcmoe push {out} --repo_id org/recipe" in proc.stdout


def test_recipe_validation_is_one_line_errors():
    from hf_fcmoe.config import load_config

    with pytest.raises(ValueError, match="hub_strategy 'checkpoint' is not supported"):
        load_config(overrides={"push_to_hub": True, "hub_model_id": "org/x", "hub_strategy": "checkpoint"})
    with pytest.raises(ValueError, match="push_to_hub needs hub_model_id"):
        load_config(overrides={"push_to_hub": True})
    with pytest.raises(ValueError, match="invalid hub_model_id"):
        load_config(overrides={"push_to_hub": True, "hub_model_id": "no namespace"})
    with pytest.raises(ValueError, match="push_to_hub_repo"):
        load_config(overrides={"push_to_hub_repo": "me/x"})  # the old no-op field is gone


def test_a_client_round_never_pushes(tiny_run_config):
    """push_to_hub is the federation's: the local Trainer of a client gets push_to_hub=False, and a round trains with
    the Hub unreachable (this test session is offline: any Hub call would raise)."""
    from hf_fcmoe.adapters.lora import apply_expert_lora, build_lora_config
    from hf_fcmoe.data.federated import load_federated_data
    from hf_fcmoe.federation.client import ClientWorker
    from hf_fcmoe.models.families import build_tiny_moe, get_family
    from hf_fcmoe.training.trainer import adapter_state

    config = tiny_run_config(push_to_hub=True, hub_model_id="org/never", hub_strategy="every_save", max_steps=1)
    model, tokenizer = build_tiny_moe("mixtral")
    peft_model = apply_expert_lora(model, build_lora_config(get_family(model.config)))
    worker = ClientWorker(peft_model, tokenizer, config)
    args = worker.local_args(seed=0)
    assert args.push_to_hub is False and config.push_to_hub is True
    data = load_federated_data(config.data_spec())
    splits = worker.prepare(data.train["client_000"], data.eval["client_000"])
    update = worker.train("client_000", splits, adapter_state(peft_model), seed=0)
    assert update.num_examples > 0


def test_run_directory_loads_from_a_tarball_anywhere(fed_run, tmp_path, monkeypatch):
    """Issue 15: no adapter_config.json stores an absolute path; a copied (tarred) run loads from wherever it is."""
    import tarfile

    import torch

    from hf_fcmoe.adapters.loading import load_adapter_model

    _, result = fed_run
    for config_path in result.output_dir.rglob("adapter_config.json"):
        base = json.loads(config_path.read_text())["base_model_name_or_path"]
        assert not os.path.isabs(base) and (config_path.parent / base / "config.json").is_file(), config_path
    with tarfile.open(tmp_path / "run.tar.gz", "w:gz") as tar:
        tar.add(result.output_dir, arcname="run")
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        tar.extractall(tmp_path / "elsewhere", filter="data")
    monkeypatch.chdir(tmp_path)  # neither the run's parent nor the copy's
    probe = torch.tensor([[5, 17, 42, 99]])
    for sub in ["global", "personalized/client_001"]:
        copied = load_adapter_model(tmp_path / "elsewhere" / "run" / sub)
        original = load_adapter_model(result.output_dir / sub)
        with torch.no_grad():
            assert torch.equal(copied(probe).logits, original(probe).logits), sub


def test_lora_config_with_a_base_path_raises_no_peft_rename_warning(recwarn):
    from hf_fcmoe.adapters.lora import apply_expert_lora, build_lora_config
    from hf_fcmoe.models.families import build_tiny_moe, get_family

    model, _ = build_tiny_moe("mixtral")
    apply_expert_lora(model, build_lora_config(get_family(model.config), base_model_name_or_path="/somewhere/base"))
    assert not [w for w in recwarn if "was renamed" in str(w.message)]


def test_readme_share_on_the_hub_commands_work_as_written(fed_run, hub, tmp_path):
    """The README's push command (on this test's run instead of runs/tiny-fcmoe) and its loading snippet."""
    import re

    _, result = fed_run
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Share on the Hub", 1)[1].split("\n### ", 1)[0]
    bash, python = (
        re.findall(r"```bash\n(.*?)```", section, re.S)[0],
        re.findall(r"```python\n(.*?)```", section, re.S),
    )
    env = hub_env(hub, tmp_path / "home")
    pushes = [line for line in bash.splitlines() if line.startswith("hf-fcmoe push")]
    assert pushes
    for line in pushes:
        args = line.replace("runs/tiny-fcmoe", str(result.output_dir)).split()[1:]
        proc = run_cli(args, env)
        assert proc.returncode == 0, proc.stderr
    assert f"{hub.url}".startswith("http://127.0.0.1") and "export HF_ENDPOINT=" in bash
    code = python[0] + "\nprint(type(model).__name__, sorted(model.peft_config))\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PeftModel" in proc.stdout and "client_000" in proc.stdout


def test_only_the_hub_package_writes_to_the_hub():
    writes = ("create_commit", "create_repo", "create_branch", "create_tag", "upload_folder", "upload_file", "HfApi(")
    package = REPO_ROOT / "hf_fcmoe"
    offenders = [
        f"{path.relative_to(package)}: {name}"
        for path in package.rglob("*.py")
        if "hub" not in path.relative_to(package).parts[:1]
        for name in writes
        if name in path.read_text()
    ]
    assert offenders == []


def test_a_tag_from_another_run_is_an_error_not_a_silent_skip(fed_run, hub, tmp_path):
    _, result = fed_run
    env = hub_env(hub, tmp_path / "home")
    assert run_cli(["push", str(result.output_dir), "--repo_id", "org/stale", "--yes"], env).returncode == 0
    other = tmp_path / "other"
    shutil.copytree(result.output_dir, other)
    with (other / "global" / "adapter_model.safetensors").open("ab") as handle:
        handle.write(b"\0")  # another run's final adapter, same round number
    head = hub.refs("org/stale")["branches"]["main"]
    proc = run_cli(["push", str(other), "--repo_id", "org/stale", "--yes"], env)
    one_line_error(proc, "tag round-2 of org/stale already names another adapter", "new --repo_id")
    assert hub.refs("org/stale")["branches"]["main"] == head


def test_personalized_adapters_in_their_own_repos(fed_run, hub, tmp_path):
    _, result = fed_run
    args = ["push", str(result.output_dir), "--repo_id", "org/own", "--clients", "client_001", "--yes"]
    proc = run_cli([*args, "--personalized_repo_id", "org/own-{client_id}"], hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(hub.refs("org/own")["branches"]) == ["main"]
    files = hub.commits("org/own-client_001")[0]["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png"} <= set(files)
    repo = hub.store.repo("org/own-client_001")
    card = repo.read(files["README.md"]).decode()
    assert 'PeftModel.from_pretrained(base, "org/own-client_001")' in card  # main: no revision in the snippet
    local = (result.output_dir / "personalized" / "client_001" / "adapter_model.safetensors").read_bytes()
    assert repo.read(files["adapter_model.safetensors"]) == local
    bad = run_cli([*args, "--personalized_repo_id", "org/own"], hub_env(hub, tmp_path))
    one_line_error(bad, "must contain '{client_id}'")
