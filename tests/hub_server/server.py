"""A loopback HTTP server speaking the subset of the Hugging Face Hub API that `huggingface_hub` 2.x uses to
create repos, commit files (regular and classic LFS: run the client with HF_HUB_DISABLE_XET=1), branch, tag,
list trees/paths and refs, read revision info and download files by revision (`hf_hub_download`,
`snapshot_download`, `PeftModel.from_pretrained`, `AutoModel.from_pretrained`).

Routes and payloads follow huggingface_hub's own client code (hf_api.py, _commit_api.py, lfs.py,
file_download.py). `HubServer.fail(...)` injects faults (an HTTP status for the next n matching requests).
Run standalone: ``python -m tests.hub_server --port 8765 --root /tmp/hub --token hf_test``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hub_server.store import HubError, HubStore, Repo, is_lfs_path

REPO = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)", "list_commits"),
    ("GET", rf"/api/models/{REPO}/refs", "refs"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<name>[^/]+)", "create_branch"),
    ("POST", rf"/api/models/{REPO}/tag/(?P<rev>[^/]+)", "create_tag"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


@dataclass
class Fault:
    method: str
    path_pattern: str
    status: int
    times: int
    after: bool = False  # carry the request out, then answer `status` (a lost response)


class HubServer:
    """The server object: start() in a thread, stop() by its handle; state lives under `root`."""

    def __init__(self, root: str | Path, token: str | None = "hf_test_token", host: str = "127.0.0.1", port: int = 0):
        self.store = HubStore(root)
        self.token = token
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        handler = type("BoundHandler", (HubRequestHandler,), {"hub": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def fail(self, method: str, path_pattern: str, status: int = 500, times: int = 1, after: bool = False) -> None:
        """Answer the next `times` requests matching (method, regex on the path) with `status`; `after`: only
        once the request has been carried out (the change happened, its answer is lost)."""
        self.faults.append(Fault(method, path_pattern, status, times, after))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.store.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and re.search(fault.path_pattern, path):
                    fault.times -= 1
                    return fault
        return None

    # --- helpers for tests
    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        repo = self.store.repo(repo_id)
        return repo.history(repo.resolve(revision))

    def refs(self, repo_id: str) -> dict:
        return self.store.repo(repo_id).refs


class HubRequestHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read results, not access logs
        pass

    # --- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._json({"error": error.message}, error.status, headers)

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path, self.query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append((self.command, path))
        body = self._body() if self.command in ("POST", "PUT") else b""
        fault = self.hub.take_fault(self.command, path)
        if fault is not None and not fault.after:
            return self._error(HubError(fault.status, f"injected fault {fault.status}"))
        if fault is not None:  # carry it out into a discarded buffer, then answer the fault
            real, self.wfile = self.wfile, io.BytesIO()
            self._route(path, body)
            self.wfile = real
            return self._error(HubError(fault.status, f"injected fault {fault.status} (after the change)"))
        self._route(path, body)

    def _route(self, path: str, body: bytes) -> None:
        for method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                try:
                    with self.hub.store.lock:
                        return getattr(self, name)(body=body, **match.groupdict())
                except HubError as error:
                    return self._error(error)
        self._error(HubError(404, f"no route {self.command} {path}"))

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # --- auth
    def _authorized(self) -> bool:
        expected = self.hub.token
        return expected is None or self.headers.get("Authorization") == f"Bearer {expected}"

    def _require_token(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _readable(self, repo_id: str) -> Repo:
        repo = self.hub.store.repo(repo_id)
        if repo.meta["private"] and not self._authorized():
            raise HubError(401, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        self._require_token()
        return self.hub.store.repo(repo_id)

    def _branch_head(self, repo: Repo, branch: str) -> str:
        heads = repo.refs["branches"]
        if branch not in heads:
            raise HubError(404, f"Invalid rev id: {branch} (not a branch)", "RevisionNotFound")
        return heads[branch]

    # --- routes
    def whoami(self, body: bytes) -> None:
        self._require_token()
        self._json({"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})

    def validate_yaml(self, body: bytes) -> None:
        """The card's metadata block must be a YAML mapping (what the Hub checks before a README commit)."""
        import yaml

        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            ok = match is None or isinstance(yaml.safe_load(match.group(1)) or {}, dict)
        except yaml.YAMLError:
            ok = False
        if not ok:
            raise HubError(400, "Invalid metadata in README.md")
        self._json({"warnings": [], "errors": []})

    def create_repo(self, body: bytes) -> None:
        self._require_token()
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"tester/{repo_id}"
        url = f"{self.hub.url}/{repo_id}"
        try:
            self.hub.store.create_repo(repo_id, private=payload.get("visibility") == "private")
        except HubError as error:  # the Hub's 409 answer carries the url too
            return self._json({"error": error.message, "url": url}, error.status, {"X-Error-Message": error.message})
        self._json({"url": url, "name": repo_id})

    def repo_info(self, body: bytes, repo: str, rev: str | None = None) -> None:
        handle = self._readable(repo)
        commit_id = handle.resolve(rev or "main")
        commit = handle.commit(commit_id)
        self._json(
            {
                "id": repo,
                "modelId": repo,
                "sha": commit_id,
                "private": handle.meta["private"],
                "siblings": [{"rfilename": path} for path in sorted(commit["files"])],
                "tags": [],
            }
        )

    def preupload(self, body: bytes, repo: str, rev: str) -> None:
        handle = self._writable(repo)
        files = handle.commit(self._branch_head(handle, rev))["files"]
        out = []
        for item in json.loads(body)["files"]:
            lfs = is_lfs_path(item["path"], item["size"])
            remote = files.get(item["path"])
            oid = None
            if remote is not None:
                oid = remote["lfs"]["oid"] if remote.get("lfs") else remote["oid"]
            out.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": out, "commitOid": self._branch_head(handle, rev)})

    def lfs_batch(self, body: bytes, repo: str) -> None:
        handle = self._writable(repo)
        objects = []
        for item in json.loads(body)["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if not handle.has_lfs(item["oid"]):
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{repo}/{item['oid']}"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, body: bytes, repo: str, oid: str) -> None:
        self.hub.store.repo(repo).put_lfs(oid, body)  # presigned-URL style: no token needed, as on S3
        self._send(200)

    def commit(self, body: bytes, repo: str, rev: str) -> None:
        handle = self._writable(repo)
        head = self._branch_head(handle, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            raise HubError(412, f"A commit has happened since {parent}: {rev} is at {head}")
        files = dict(handle.commit(head)["files"])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = handle.regular_entry(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                files[value["path"]] = handle.lfs_entry(value["oid"], int(value["size"]))
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: entry for path, entry in files.items() if not path.startswith(prefix)}
        commit_id = handle.new_commit(head, files, header.get("summary", ""), header.get("description", ""))
        handle.set_ref("branches", rev, commit_id)
        self._json({"commitUrl": f"{self.hub.url}/{repo}/commit/{commit_id}", "commitOid": commit_id, "success": True})

    def list_commits(self, body: bytes, repo: str, rev: str) -> None:
        handle = self._readable(repo)
        history = handle.history(handle.resolve(rev))
        self._json(
            [
                {
                    "id": item["id"],
                    "title": item["title"],
                    "message": item["message"],
                    "authors": [{"user": "tester"}],
                    "date": "2026-01-01T00:00:00.000Z",
                }
                for item in history
            ]
        )

    def refs(self, body: bytes, repo: str) -> None:
        refs = self._readable(repo).refs

        def items(kind: str, prefix: str) -> list[dict]:
            return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": c} for n, c in sorted(refs[kind].items())]

        self._json(
            {
                "branches": items("branches", "refs/heads/"),
                "tags": items("tags", "refs/tags/"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def create_branch(self, body: bytes, repo: str, name: str) -> None:
        handle = self._writable(repo)
        if name in handle.refs["branches"]:
            raise HubError(409, f"Reference refs/heads/{name} already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        handle.set_ref("branches", name, handle.resolve(start))
        self._json({})

    def create_tag(self, body: bytes, repo: str, rev: str) -> None:
        handle = self._writable(repo)
        tag = json.loads(body)["tag"]
        if tag in handle.refs["tags"]:
            raise HubError(409, f"Tag {tag} already exists")
        handle.set_ref("tags", tag, handle.resolve(rev))
        self._json({})

    @staticmethod
    def _entry(path: str, entry: dict) -> dict:
        out = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
        if entry.get("lfs"):
            out["lfs"] = entry["lfs"]
        return out

    def _listing(self, files: dict, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path.rstrip('/')}/" if path else ""
        out, folders = [], set()
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest:
                parts = rest.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add(prefix + "/".join(parts[:depth]))
                if not recursive:
                    continue
            out.append(self._entry(name, files[name]))
        out += [{"type": "directory", "path": folder, "oid": "0" * 40} for folder in sorted(folders)]
        return out

    def tree(self, body: bytes, repo: str, rev: str, path: str | None = None) -> None:
        handle = self._readable(repo)
        files = handle.commit(handle.resolve(rev))["files"]
        path = (path or "").strip("/")
        if path and path in files:
            return self._json([self._entry(path, files[path])])
        listing = self._listing(files, path, self.query.get("recursive", ["False"])[0].lower() == "true")
        if path and not listing:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        self._json(listing)

    def paths_info(self, body: bytes, repo: str, rev: str) -> None:
        handle = self._readable(repo)
        files = handle.commit(handle.resolve(rev))["files"]
        paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for path in paths:
            if path in files:
                out.append(self._entry(path, files[path]))
            elif any(name.startswith(path.rstrip("/") + "/") for name in files):
                out.append({"type": "directory", "path": path, "oid": "0" * 40})
        self._json(out)

    def resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        handle = self._readable(repo)
        commit_id = handle.resolve(rev)
        entry = handle.commit(commit_id)["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry.get("lfs"):
            headers["X-Linked-Etag"] = f'"{entry["lfs"]["oid"]}"'
            headers["X-Linked-Size"] = entry["size"]
        data = handle.read(entry)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged and self.command == "GET":
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers, "application/octet-stream")
        if self.command == "HEAD":
            self.send_response(200)
            for key, value in {**headers, "Content-Length": len(data)}.items():
                self.send_header(key, str(value))
            self.end_headers()
            return None
        self._send(200, data, headers, "application/octet-stream")
