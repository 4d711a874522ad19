"""The only code of the package that writes to the Hugging Face Hub (through `huggingface_hub.HfApi`).

A push is a list of `PushTarget`s (see plan.py); each becomes at most one `create_commit` on its branch, made
only when some file's hash differs from the remote one (sha256 for LFS files, the git blob sha1 for regular
files) and guarded by `parent_commit` (compare-and-swap: a branch that moved meanwhile is never overwritten).
A commit is all of an adapter or nothing, and a round's tag is created only after its commit exists, so an
interrupted push leaves no branch or tag pointing at a partial adapter; running it again completes it.
Transient answers (5xx, 429, connection errors) are retried with exponential backoff; when retries run out
the error says what was and was not pushed. The local run directory is only read.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from hf_fcmoe.hub.plan import PushPlan, PushTarget, UploadFile, plan_node_push, plan_push

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError

RETRY_STATUS = (429, 500, 502, 503, 504)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class HubPushError(ConnectionError):
    """A push that stopped part-way; the message lists what was and was not pushed."""


@dataclass
class PushReport:
    committed: list[str] = field(default_factory=list)  # target labels with a new commit
    unchanged: list[str] = field(default_factory=list)  # targets whose files already matched the remote
    tags: list[str] = field(default_factory=list)  # tags created
    commits: dict[str, str] = field(default_factory=dict)  # label -> commit id the branch points at now

    def summary(self) -> str:
        parts = [f"{len(self.committed)} commit(s)"]
        if self.unchanged:
            parts.append(f"{len(self.unchanged)} unchanged")
        if self.tags:
            parts.append(f"tags {', '.join(self.tags)}")
        return "pushed: " + "; ".join(parts)


def resolve_endpoint(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token(token: str | None, endpoint: str) -> str:
    """An explicit token, else HF_TOKEN, else the one `hf auth login` stored; pushing always needs one."""
    token = token or get_token()
    if not token:
        raise ValueError(
            f"no Hugging Face token to push to {endpoint}: set HF_TOKEN, run `hf auth login`, or pass --token"
        )
    return token


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _changed(file: UploadFile, remote) -> bool:
    """Whether the local file differs from the remote entry (None: absent remotely)."""
    if remote is None or getattr(remote, "size", None) != file.size:
        return True
    data = file.read()
    if remote.lfs is not None:
        return hashlib.sha256(data).hexdigest() != remote.lfs.sha256
    return _git_blob_sha1(data) != remote.blob_id


class HubPublisher:
    """Pushes `PushPlan`s to one endpoint with one token."""

    def __init__(
        self,
        token: str | None = None,
        endpoint: str | None = None,
        retries: int = 4,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.endpoint = resolve_endpoint(endpoint)
        if constants.is_offline_mode():
            raise ValueError(f"HF_HUB_OFFLINE is set: unset it to push to {self.endpoint}")
        self.token = resolve_token(token, self.endpoint)
        self.api = HfApi(endpoint=self.endpoint, token=self.token)
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self._planned: list[str] = []
        self._done: list[str] = []
        self._ref_cache: dict[str, tuple[dict[str, str], set[str]]] = {}

    # --- calls with retry and clear errors
    def _call(self, what: str, fn, *args, **kwargs):
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except HubPushError:
                raise
            except HfHubHTTPError as error:
                status = error.response.status_code if error.response is not None else None
                if status in RETRY_STATUS and attempt < self.retries:
                    self.sleep(self.backoff_s * 2**attempt)
                    continue
                raise self._failure(what, self._describe_http(error, status, attempt)) from error
            except (TransportError, ConnectionError, TimeoutError) as error:
                if attempt < self.retries:
                    self.sleep(self.backoff_s * 2**attempt)
                    continue
                raise self._failure(what, f"cannot reach {self.endpoint} ({type(error).__name__})") from error
            except RuntimeError as error:  # an LFS upload failure, wrapped by huggingface_hub
                cause = error.__cause__
                if isinstance(cause, HfHubHTTPError | TransportError) and attempt < self.retries:
                    self.sleep(self.backoff_s * 2**attempt)
                    continue
                raise self._failure(what, str(error)) from error
        raise AssertionError("unreachable")

    def _describe_http(self, error: HfHubHTTPError, status: int | None, attempt: int) -> str:
        if status == 401:
            return f"{self.endpoint} refused the token (401): check HF_TOKEN / --token"
        if status == 403:
            return "the token may not write there (403): use a token with write access to the namespace"
        if status == 412:
            return "the branch moved while pushing (412): someone else pushed; run the push again"
        tries = f" after {attempt + 1} attempts" if status in RETRY_STATUS else ""
        return f"HTTP {status}{tries}: {str(error).splitlines()[0]}"

    def _failure(self, what: str, reason: str) -> HubPushError:
        pending = [label for label in self._planned if label not in self._done]
        done = ", ".join(self._done) or "nothing"
        return HubPushError(
            f"push stopped at {what}: {reason}; pushed: {done}; not pushed: {', '.join(pending) or 'nothing'}; "
            "nothing points at a partial adapter: run the same push again to finish it"
        )

    # --- remote state
    def published_tags(self, repo_id: str, run_dir: str | Path | None = None) -> set[str]:
        """Tags of `repo_id` (empty when the repo does not exist yet); with `run_dir`, each `round-<t>` tag must name
        that run's round-t adapter (a tag left by another run is an error, never silently skipped)."""
        if not self._call(f"checking {repo_id}", self.api.repo_exists, repo_id):
            return set()
        tags = {ref.name for ref in self._call(f"listing refs of {repo_id}", self.api.list_repo_refs, repo_id).tags}
        for tag in sorted(tags):
            round_index = tag.removeprefix("round-")
            local = Path(run_dir or "") / "rounds" / round_index / "global" / ADAPTER_WEIGHTS
            if run_dir is not None and round_index.isdigit() and local.is_file():
                self._check_tag(repo_id, tag, UploadFile(ADAPTER_WEIGHTS, source=local))
        return tags

    def _check_tag(self, repo_id: str, tag: str, weights: UploadFile) -> None:
        infos = self._call(
            f"reading {repo_id}@{tag}", self.api.get_paths_info, repo_id, [ADAPTER_WEIGHTS], revision=tag
        )
        if not infos or _changed(weights, infos[0]):
            raise ValueError(
                f"tag {tag} of {repo_id} already names another adapter (pushed from another run?): "
                "push this run to a new --repo_id"
            )

    def _refs(self, repo_id: str) -> tuple[dict[str, str], set[str]]:
        """Branch heads and tags of a repo, read once per push (then kept up to date by the push itself)."""
        if repo_id not in self._ref_cache:
            refs = self._call(f"listing refs of {repo_id}", self.api.list_repo_refs, repo_id)
            heads = {ref.name: ref.target_commit for ref in refs.branches}
            self._ref_cache[repo_id] = (heads, {ref.name for ref in refs.tags})
        return self._ref_cache[repo_id]

    def _head(self, repo_id: str, branch: str) -> str:
        heads, _ = self._refs(repo_id)
        if branch not in heads:
            self._call(f"creating branch {branch} of {repo_id}", self.api.create_branch, repo_id, branch=branch)
            self._ref_cache.pop(repo_id)
            heads, _ = self._refs(repo_id)
        return heads[branch]

    def _remote_files(self, repo_id: str, commit: str) -> dict:
        entries = self._call(
            f"listing files of {repo_id}@{commit[:8]}",
            lambda: list(self.api.list_repo_tree(repo_id, revision=commit, recursive=True)),
        )
        return {entry.path: entry for entry in entries if hasattr(entry, "blob_id")}

    # --- the push
    def push(self, plan: PushPlan) -> PushReport:
        report = PushReport()
        self._planned = [self._label(t) for t in plan.targets]
        self._done = []
        for repo_id in plan.repos:
            self._call(f"creating {repo_id}", self.api.create_repo, repo_id, private=plan.private, exist_ok=True)
        self._ref_cache: dict[str, tuple[dict[str, str], set[str]]] = {}
        for target in plan.targets:  # before any commit: a tag this push would reuse must name the same adapter
            weights = [f for f in target.files if f.path_in_repo == ADAPTER_WEIGHTS]
            if target.tag and weights and target.tag in self._refs(target.repo_id)[1]:
                self._check_tag(target.repo_id, target.tag, weights[0])
        for target in plan.targets:
            commit = self._push_target(target, report)
            self._refs(target.repo_id)[0][target.branch] = commit
            if target.tag:
                repo_tags = self._refs(target.repo_id)[1]
                if target.tag not in repo_tags:
                    self._call(
                        f"tagging {target.label} {target.tag}",
                        self.api.create_tag,
                        target.repo_id,
                        tag=target.tag,
                        revision=commit,
                        tag_message=target.message,
                    )
                    repo_tags.add(target.tag)
                    report.tags.append(target.tag)
            self._done.append(self._label(target))
        return report

    @staticmethod
    def _label(target: PushTarget) -> str:
        return f"{target.label} ({target.describe()}{', tag ' + target.tag if target.tag else ''})"

    def _push_target(self, target: PushTarget, report: PushReport) -> str:
        head = self._head(target.repo_id, target.branch)
        remote = self._remote_files(target.repo_id, head)
        changed = [f for f in target.files if _changed(f, remote.get(f.path_in_repo))]
        if not changed:
            report.unchanged.append(target.label)
            report.commits[target.label] = head
            return head

        attempts = []

        def commit():
            attempts.append(1)
            if len(attempts) > 1:  # a retry: the last attempt may have landed with its answer lost
                self._ref_cache.pop(target.repo_id, None)
                current = self._head(target.repo_id, target.branch)
                now = self._remote_files(target.repo_id, current) if current != head else None
                if now is not None and not any(_changed(f, now.get(f.path_in_repo)) for f in changed):
                    return SimpleNamespace(oid=current)
            # fresh operations per attempt: huggingface_hub marks committed ones as used
            operations = [
                CommitOperationAdd(f.path_in_repo, f.content if f.content is not None else str(f.source))
                for f in changed
            ]
            return self.api.create_commit(
                target.repo_id,
                operations,
                commit_message=target.message,
                revision=target.branch,
                parent_commit=head,
            )

        info = self._call(f"committing {target.label}", commit)
        report.committed.append(target.label)
        report.commits[target.label] = info.oid
        return info.oid


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    clients: str | list[str] | None = None,
    personalized_repo_id: str | None = None,
    rounds: str | int = "final",
    base_repo_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    confirm: Callable[[PushPlan, str], bool] | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> PushReport | None:
    """Publish a run directory (see `plan_push` for the layout). `confirm(plan, endpoint)` may decline (-> None).

    Bad input (repo id, run directory, client ids) fails before any network call; the token is checked next.
    """
    options = dict(
        clients=clients,
        personalized_repo_id=personalized_repo_id,
        base_repo_id=base_repo_id,
        private=private,
    )
    plan = plan_push(run_dir, repo_id, rounds=rounds, **options)
    publisher = HubPublisher(token=token, endpoint=endpoint, retries=retries, backoff_s=backoff_s)
    if rounds == "all":  # rounds already tagged on the Hub are not pushed again
        plan = plan_push(
            run_dir, repo_id, rounds=rounds, published_tags=publisher.published_tags(repo_id, run_dir), **options
        )
    if confirm is not None and not confirm(plan, publisher.endpoint):
        return None
    return publisher.push(plan)


def push_node_run(
    node_dir: str | Path,
    repo_id: str,
    *,
    global_repo_id: str | None,
    base_repo_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    confirm: Callable[[PushPlan, str], bool] | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> PushReport | None:
    """Publish a Flower node's personalized adapter from its state-dir with the node's own token."""
    plan = plan_node_push(node_dir, repo_id, global_repo_id, base_repo_id=base_repo_id, private=private)
    publisher = HubPublisher(token=token, endpoint=endpoint, retries=retries, backoff_s=backoff_s)
    if confirm is not None and not confirm(plan, publisher.endpoint):
        return None
    return publisher.push(plan)
