"""Crash-safe, pickle-free files of a round: hub state as safetensors + JSON, a sha256 manifest written last.

A round directory is trusted only when its ``manifest.json`` (written inside the staging folder after every
other file, before the folder is renamed into place) lists every file with its size and sha256 and they all
match. `--resume` walks back from the round state.json names to the newest intact one and redoes the rest, so
a torn write, a truncated file or a bit flip is redone, never loaded. Nothing here unpickles or executes
anything: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
HUB_TENSORS = "hub_state.safetensors"
HUB_JSON = "hub_state.json"
_SEP = "/"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (a reader sees old or new, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ----------------------------------------------------------------- server state without pickle
def _split(value, prefix: str, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[k, _split(v, f"{prefix}{_SEP}{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}{_SEP}{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"hub state holds a {type(value).__name__}; only tensors, dicts, lists and JSON scalars are saved")


def _join(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {k: _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_hub_state(folder: Path, state: dict) -> None:
    """`AggregationHub.state_dict()` as ``hub_state.safetensors`` (tensors) + ``hub_state.json`` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    save_tensors_atomic(folder / HUB_TENSORS, tensors)
    write_bytes_atomic(folder / HUB_JSON, json.dumps(skeleton, sort_keys=True).encode())


def load_hub_state(folder: Path) -> dict | None:
    """What `save_hub_state` wrote, or None when the round has no hub state."""
    if not (folder / HUB_JSON).exists():
        return None
    tensors = load_file(str(folder / HUB_TENSORS)) if (folder / HUB_TENSORS).exists() else {}
    return _join(json.loads((folder / HUB_JSON).read_text()), tensors)


# ----------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """List every file under ``folder`` with size and sha256 in ``folder/manifest.json``: call it last."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_bytes_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True).encode())


def manifest_problem(folder: Path) -> str | None:
    """Why ``folder`` is not an intact round (missing, partial, altered or extra files), or None when it is."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST} (partial or foreign round)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{manifest} is unreadable ({type(error).__name__})"
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present != set(files):
        return f"{folder}: files differ from its manifest ({sorted(present ^ set(files))[:3]})"
    for name, entry in files.items():
        path = folder / name
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


def last_intact_round(rounds_root: Path, claimed: int) -> tuple[int | None, list[str]]:
    """The newest round <= ``claimed`` whose directory passes `manifest_problem`, and the problems of newer ones."""
    problems = []
    for index in range(claimed, -1, -1):
        problem = manifest_problem(rounds_root / str(index))
        if problem is None:
            return index, problems
        problems.append(problem)
    return None, problems
