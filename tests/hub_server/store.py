"""On-disk state of the loopback Hub: repositories, commits (file trees), refs, blobs.

Every commit is a JSON manifest `{path: file entry}` whose content lives in content-addressed files
(`blobs/<git sha1>` for regular files, `lfs/<sha256>` for LFS files), so each revision's files are
real files on disk and old revisions stay readable after newer commits.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".png", ".jpg", ".jpeg", ".npy", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs_path(path: str, size: int) -> bool:
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


class HubError(Exception):
    """An API error: HTTP status, the Hub's X-Error-Code (or None) and a message."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Repo:
    root: Path

    def _read(self, name: str) -> dict:
        return json.loads((self.root / name).read_text())

    def _write(self, name: str, data: dict) -> None:
        tmp = self.root / f"{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(self.root / name)

    @property
    def meta(self) -> dict:
        return self._read("meta.json")

    @property
    def refs(self) -> dict:
        return self._read("refs.json")

    def set_ref(self, kind: str, name: str, commit: str) -> None:
        refs = self.refs
        refs[kind][name] = commit
        self._write("refs.json", refs)

    def commit(self, commit_id: str) -> dict:
        return json.loads((self.root / "commits" / f"{commit_id}.json").read_text())

    def resolve(self, revision: str) -> str:
        """A branch, tag or full commit id -> the commit id."""
        refs = self.refs
        for kind in ("branches", "tags"):
            if revision in refs[kind]:
                return refs[kind][revision]
        if (self.root / "commits" / f"{revision}.json").exists():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, commit_id: str) -> list[dict]:
        commits = []
        while commit_id:
            commit = self.commit(commit_id)
            commits.append({"id": commit_id, **commit})
            commit_id = commit["parent"]
        return commits

    # --- content
    def has_lfs(self, sha256: str) -> bool:
        return (self.root / "lfs" / sha256).exists()

    def put_lfs(self, sha256: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(400, f"uploaded content does not match its sha256 {sha256}")
        (self.root / "lfs" / sha256).write_bytes(data)

    def read(self, entry: dict) -> bytes:
        if entry.get("lfs"):
            return (self.root / "lfs" / entry["lfs"]["oid"]).read_bytes()
        return (self.root / "blobs" / entry["oid"]).read_bytes()

    def regular_entry(self, data: bytes) -> dict:
        oid = git_blob_sha1(data)
        (self.root / "blobs" / oid).write_bytes(data)
        return {"oid": oid, "size": len(data)}

    def lfs_entry(self, sha256: str, size: int) -> dict:
        if not self.has_lfs(sha256):
            raise HubError(422, f"LFS object {sha256} was never uploaded")
        pointer = lfs_pointer(sha256, size)
        return {
            "oid": git_blob_sha1(pointer),
            "size": size,
            "lfs": {"oid": sha256, "size": size, "pointerSize": len(pointer)},
        }

    def new_commit(self, parent: str | None, files: dict, title: str, message: str = "") -> str:
        body = {"parent": parent, "files": files, "title": title, "message": message, "date": time.time()}
        commit_id = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        (self.root / "commits" / f"{commit_id}.json").write_text(json.dumps(body, indent=1, sort_keys=True))
        return commit_id


class HubStore:
    """All repositories under `root`; one lock serialises every change (the server is threaded)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def repo(self, repo_id: str) -> Repo:
        repo = Repo(self.root / "models" / repo_id)
        if not (repo.root / "meta.json").exists():
            raise HubError(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        root = self.root / "models" / repo_id
        if (root / "meta.json").exists():
            raise HubError(409, "You already created this model repo")
        for sub in ("commits", "blobs", "lfs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        repo = Repo(root)
        repo._write("refs.json", {"branches": {}, "tags": {}})
        gitattributes = repo.regular_entry(GITATTRIBUTES.encode())
        first = repo.new_commit(None, {".gitattributes": gitattributes}, "initial commit")
        repo.set_ref("branches", "main", first)
        repo._write("meta.json", {"id": repo_id, "private": private, "created": time.time()})
        return repo
