"""A real Flower deployment on loopback for tests: one flower-superlink, N flower-supernode, `flwr run`.

Every process is started in its own process group and recorded by PID; `stop()` kills the groups and
every descendant found under them (Flower's clientapp/serverapp children run in their own sessions and
outlive their parents), so nothing survives a test, also when it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "recipes" / "flower"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class LoopbackFederation:
    """Start/stop a loopback deployment; `node_configs[i]` is the --node-config string of node i."""

    def __init__(self, work: Path, node_configs: list[str], certs: Path | None = None, keys: list[Path] | None = None):
        """`certs` (ca.crt, server.pem, server.key) switches on TLS; `keys` (one ECDSA private key per node, as
        recipes/flower/README.md makes them) switches on SuperNode authentication."""
        self.work = Path(work)
        self.node_configs = node_configs
        self.certs = certs
        self.keys = keys
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.known: set[int] = set()  # every PID seen under our processes (killed at stop)
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            # SuperLink and SuperNodes start flower-superexec / flwr-clientapp / flwr-serverapp by name
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        }

    def _start(self, name: str, args: list[str], home: Path, cwd: Path | None = None) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env={**self.env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        self.known.add(proc.pid)
        return proc

    def _transport(self) -> list[str]:
        return ["--insecure"] if self.certs is None else []

    def start(self) -> LoopbackFederation:
        secure = []
        if self.certs is not None:
            c = self.certs
            secure = ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem")]
            secure += ["--ssl-keyfile", str(c / "server.key")]
        if self.keys is not None:
            secure.append("--enable-supernode-auth")
        self._start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                *self._transport(),
                *secure,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
            + ["--disable-runtime-dependency-installation"],
            self.work / "home" / "superlink",
        )
        self._wait_port(self.port)
        for key in self.keys or []:
            done = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", f"{key}.pub", "local"],
                env={**self.env, "FLWR_HOME": str(self._operator_home())},
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                raise RuntimeError(f"flwr supernode register failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        for index in range(len(self.node_configs)):
            self.start_node(index)
        return self

    def _operator_home(self) -> Path:
        """The FLWR_HOME of `flwr` (run, register): its config.toml names this SuperLink."""
        home = self.work / "home" / "operator"
        home.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{self.port}"
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]", f'address = "{address}"']
        lines.append("insecure = true" if self.certs is None else f'root-certificates = "{self.certs / "ca.crt"}"')
        (home / "config.toml").write_text("\n".join(lines) + "\n")
        return home

    def start_node(self, index: int) -> subprocess.Popen:
        secure = [] if self.certs is None else ["--root-certificates", str(self.certs / "ca.crt")]
        if self.keys is not None:
            secure += ["--auth-supernode-private-key", str(self.keys[index])]
        return self._start(
            f"node{index}",
            [str(BIN / "flower-supernode"), *self._transport(), *secure, "--superlink", f"127.0.0.1:{self.port}"]
            + ["--host", "127.0.0.1", "--port", str(free_port()), "--node-config", self.node_configs[index]],
            self.work / "home" / f"node{index}",
        )

    def kill_node(self, index: int) -> None:
        """SIGKILL a SuperNode and whatever it started (as a crash would)."""
        proc = self.procs[f"node{index}"]
        for pid in [proc.pid, *descendants(proc.pid)]:
            _kill(pid)
        proc.wait(timeout=30)

    def submit(self, run_config: str, name: str = "run") -> subprocess.Popen:
        """`flwr run APP_DIR local --stream --run-config ...` in the background."""
        home = self._operator_home()
        args = [str(BIN / "flwr"), "run", str(APP_DIR), "local", "--stream", "--run-config", run_config]
        return self._start(f"flwr-{name}", args, home)

    def serverapp_pids(self) -> list[int]:
        pids = [pid for pid in descendants(self.procs["superlink"].pid) if "flwr-serverapp" in cmdline(pid)]
        self.known.update(pids)
        return pids

    def _wait_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"superlink did not listen on {port}: {self.log('superlink')[-2000:]}")

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _ours(self) -> list[int]:
        """Processes whose environment names this deployment's folder (orphaned clientapps included)."""
        marker = str(self.work).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def stop(self) -> None:
        """Kill every process group we started and every descendant seen, then reap."""
        for proc in self.procs.values():
            self.known.update(descendants(proc.pid))
        self.known.update(self._ours())
        self.known.discard(os.getpid())
        for pid in sorted(self.known):
            _kill(pid)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def survivors(self, grace: float = 15.0) -> list[int]:
        """Our processes still running after `grace` seconds (a SIGKILLed process takes a moment to go)."""
        deadline = time.monotonic() + grace
        while True:
            pids = (self.known | set(self._ours())) - {os.getpid()}
            alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and _state(pid) != "zombie"]
            if not alive or time.monotonic() > deadline:
                return [f"{pid}: {cmdline(pid)[:200]}" for pid in alive]
            time.sleep(0.5)


def _state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    line = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "zombie" if "Z" in line.split(":", 1)[-1][:3] else line
