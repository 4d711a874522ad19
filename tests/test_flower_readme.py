"""recipes/flower/README.md, followed step by step: its marked blocks (`<!-- readme-test: NAME -->` before a fence)
run as written, with only the placeholders replaced (host name -> 127.0.0.1, ports -> free ones, the example
paths -> folders of this test, `my_recipe.yaml` -> a one-node tiny recipe, `num-processes=4` -> 1).

Commands run in a work folder whose `recipes` links to the repository's, so the README's relative paths
(`recipes/flower`, `certs/`, `keys/`, `$PWD/runs/...`) resolve as they do for a user in a checkout. Every process
started is killed by PID at the end (tests/flower_loopback.py), also when a step fails.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

from tests.conftest import TINY_RUN  # noqa: E402
from tests.flower_loopback import REPO, LoopbackFederation, free_port  # noqa: E402

pytestmark = pytest.mark.slow
README = REPO / "recipes" / "flower" / "README.md"
RUN_TIMEOUT_S = 1500
DAEMONS = ("flower-superlink", "flower-supernode")


def readme_block(name: str) -> str:
    """The fenced block after `<!-- readme-test: name -->`, dedented."""
    match = re.search(
        rf"<!-- readme-test: {re.escape(name)} -->\n([ \t]*)```\w*\n(.*?)\n[ \t]*```", README.read_text(), re.S
    )
    assert match, f"README has no block marked readme-test: {name}"
    indent = match.group(1)
    return "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in match.group(2).split("\n"))


def substitute(text: str, placeholders: dict[str, str]) -> str:
    """Replace each placeholder (in order: a longer one before its prefix); each must be in the README block."""
    missing = [placeholder for placeholder in placeholders if placeholder not in text]
    assert not missing, f"placeholders {missing} are no longer in the README block:\n{text}"
    for placeholder, value in placeholders.items():
        text = text.replace(placeholder, value)
    return text


def commands(block: str) -> list[str]:
    """The block's commands, one per entry (continuation lines joined, comments and blank lines dropped)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [
        line.split("  #", 1)[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


class ReadmeShell(LoopbackFederation):
    """Runs README commands in `work` and keeps every process it starts (daemons too) for `stop()`."""

    def __init__(self, work: Path):
        super().__init__(work, [])
        (work / "recipes").symlink_to(REPO / "recipes")
        self.steps = 0

    def run(self, command: str, home: Path, timeout: float = 600) -> None:
        """A command the README runs to completion (its exit status must be 0)."""
        self.steps += 1
        proc = self.daemon(command, home, f"step{self.steps}")
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"README step timed out: {command}\n{self.log(f'step{self.steps}')[-3000:]}"
            ) from None
        assert code == 0, f"README step failed ({code}): {command}\n{self.log(f'step{self.steps}')[-3000:]}"

    def daemon(self, command: str, home: Path, name: str) -> subprocess.Popen:
        """A command that keeps running (SuperLink, SuperNode), started in `work` in its own session."""
        return self._start(name, ["bash", "-c", command], home, cwd=self.work)


def _free_prefix() -> str:
    """A port prefix P such that P0, P1, P2 are free (the loopback block's `--port 910$i`)."""
    for _ in range(200):
        prefix = str(free_port() // 10)
        if len(prefix) == 4 and all(_is_free(int(f"{prefix}{i}")) for i in range(3)):
            return prefix
    raise RuntimeError("no three free ports in a row")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_readme_loopback_section_as_written(tmp_path):
    work = tmp_path / "user"
    work.mkdir()
    shell = ReadmeShell(work)
    block = substitute(readme_block("loopback"), {"9093": str(free_port()), "910$i": f"{_free_prefix()}$i"})
    try:
        shell.run(block, work / "home", timeout=RUN_TIMEOUT_S)  # the whole block, as pasted into one shell
    finally:
        shell.stop()
        assert shell.survivors() == [], "processes survived the README's loopback federation"
    out = work / "runs" / "flower-demo" / "server"
    rows = _metrics(out)
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert rows[-1]["clients"] == ["client_000", "client_001", "client_002"]
    assert (out / "global" / "adapter_model.safetensors").exists()
    run_key = json.loads((out / "federation.json").read_text())["run_key"]
    for cid in ("client_000", "client_001", "client_002"):
        node = work / "runs" / "flower-demo" / "state" / cid / "runs" / run_key
        assert (node / "personalized" / "adapter_model.safetensors").exists()


def test_readme_multi_machine_section_on_loopback(tmp_path):
    from hf_fcmoe.config import load_config
    from hf_fcmoe.federation.flower.export_data import export_client_data
    from hf_fcmoe.models.loading import load_base_model, save_base_model

    work = tmp_path / "user"
    work.mkdir()
    values = {**TINY_RUN, "aggregation_method": "fcmoe", "engine": "flower", "num_clients": 1, "num_rounds": 1}
    recipe = tmp_path / "org_recipe.yaml"
    recipe.write_text(yaml.safe_dump({**values, "max_steps": 2, "output_dir": str(tmp_path / "unused")}))
    config = load_config(recipe)
    data = export_client_data(config, tmp_path / "data")["client_000"]
    model, tokenizer = load_base_model(config.model_name_or_path, seed=config.seed)
    base = Path(save_base_model(model, tokenizer, tmp_path / "models" / "tiny"))  # the node's local copy
    port = str(free_port())
    placeholders = {
        "fl.example.org:9093": f"127.0.0.1:{port}",
        "fl.example.org": "127.0.0.1",
        "0.0.0.0": "127.0.0.1",
        "--port 9093": f"--port {port}",
        "--port 9094": f"--port {free_port()}",
        "/data/org_a": str(data),
        "/var/lib/fcmoe/org_a": str(tmp_path / "state" / "org_a"),
        "/models/Mixtral-8x7B-v0.1": str(base),
        "num-processes=4": "num-processes=1",
        "/path/to/certs/ca.crt": str(work / "certs" / "ca.crt"),
        "my_recipe.yaml": str(recipe),
        "/srv/fcmoe/run1": str(tmp_path / "server"),
    }

    def placeholders_in(name: str) -> dict[str, str]:
        block = readme_block(name)
        return {k: v for k, v in placeholders.items() if k in block}

    def step(name: str) -> list[str]:
        return commands(substitute(readme_block(name), placeholders_in(name)))

    steps = ("certs", "superlink", "operator-config", "node", "submit")
    unused = set(placeholders) - {key for name in steps for key in placeholders_in(name)}
    assert not unused, f"placeholders {sorted(unused)} are no longer in the README's multi-machine section"
    operator = work / "home" / "operator"
    shell = ReadmeShell(work)
    try:
        shell.run(substitute(readme_block("certs"), placeholders_in("certs")), operator)  # 1. TLS certificates
        (superlink,) = step("superlink")  # 2.
        assert superlink.startswith("flower-superlink")
        shell.daemon(superlink, work / "home" / "superlink", "superlink")
        shell._wait_port(int(port))
        config_toml = substitute(readme_block("operator-config"), placeholders_in("operator-config"))  # 3.
        operator.mkdir(parents=True, exist_ok=True)
        (operator / "config.toml").write_text(config_toml + "\n")
        for command in step("node"):  # 4. keys, registration, the SuperNode
            if command.startswith(DAEMONS):
                shell.daemon(command, work / "home" / "org_a", "org_a")
            else:
                shell.run(command, operator)
        (submit,) = step("submit")  # 5.
        shell.run(submit, operator, timeout=RUN_TIMEOUT_S)
    finally:
        shell.stop()
        assert shell.survivors() == [], "processes survived the README's deployment"
    rows = _metrics(tmp_path / "server")
    assert [row["round"] for row in rows] == [0, 1] and rows[-1]["clients"] == ["org_a"]
    assert (tmp_path / "server" / "global" / "adapter_model.safetensors").exists()
    personalized = list((tmp_path / "state" / "org_a").glob("runs/*/personalized/adapter_model.safetensors"))
    assert len(personalized) == 1
    assert "insecure" not in config_toml
