"""Transport-level checks of client updates, shared by every engine: reject a bad update with a reason, keep the rest.

Nothing a client sends touches the global state before `check_update` accepted it. What is checked, in order:
the client id is a safe string (it becomes a path and a Hub branch name); it was enrolled (when the server
keeps an enrolment list); ``num_examples`` is a positive int within the size the client declared and the
recipe's cap; the update was trained from the announced base/adapter config of this round (fingerprint); the
state has exactly the global's keys, each a dense CPU tensor of the global's shape and dtype with finite
values; ``expert_counts`` is an integer (layers, experts) tensor of non-negative counts within the routed-token
bound. Duplicated client ids reject *every* copy: the server cannot tell the real client from an impostor, and
"first one wins" would let an impostor that arrives first replace it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.aggregation.types import ClientUpdate, State

# Letters, digits, '_', '-', '.'; starts with a letter or digit; at most 96 characters (a Hub branch name and a
# file name on every OS). '..' and a trailing '.lock' / '.' are refused as git refs refuse them.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")

# Config entries that describe a process, a path or a library version, not the architecture the adapter fits.
_VOLATILE_BASE_KEYS = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "return_dict",
    "architectures",  # set by save_pretrained: a model built in code and its saved copy have the same architecture
}
_VOLATILE_LORA_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "runtime_config"}


class UpdateRejected(ValueError):
    """An update that cannot be aggregated; the message names the client and the problem."""

    def __init__(self, client_id: object, problem: str):
        super().__init__(f"client {_shown(client_id)}: {problem}")
        self.client_id = client_id
        self.problem = problem


def _shown(client_id: object) -> str:
    """A client id as it may appear in a message or a diagnostics key (escaped, bounded)."""
    text = repr(client_id)
    return text if len(text) <= 80 else text[:77] + "..."


def client_id_problem(client_id: object) -> str | None:
    """Why ``client_id`` is unsafe as a path component / Hub branch name, or None when it is safe."""
    if not isinstance(client_id, str):
        return f"client id must be a string, got {type(client_id).__name__}"
    if not _SAFE_ID.fullmatch(client_id):
        return (
            "client id must be 1-96 characters of letters, digits, '_', '-', '.', starting with a letter or digit "
            "(no path separators, spaces or control characters)"
        )
    if ".." in client_id or client_id.endswith((".lock", ".")):
        return "client id must not contain '..' or end with '.' or '.lock'"
    return None


def check_client_id(client_id: object) -> str:
    """Return ``client_id`` if it is safe to use in a path or a Hub branch name, else raise ValueError."""
    problem = client_id_problem(client_id)
    if problem:
        raise ValueError(f"unsafe client id {_shown(client_id)}: {problem}")
    return client_id


def _canonical(value):
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(getattr(value, "value", value))  # enums (PeftType) and anything else by its text


def update_fingerprint(base_config: Mapping, lora_config: Mapping, round_index: int) -> str:
    """sha256 of (base model config, LoRA config, round): what a client trained from, computed from configs alone.

    Both sides call it with ``model.config.to_dict()`` and ``lora_config.to_dict()``; entries that name a path,
    a dtype, a library version or a runtime flag are left out, so a client that loaded the same architecture from
    another folder agrees with the server. It catches a client on the wrong base, adapter config or round (a stale
    or replayed update), not a client that lies: it proves nothing about the weights.
    """
    base = {k: v for k, v in base_config.items() if not str(k).startswith("_") and k not in _VOLATILE_BASE_KEYS}
    lora = {k: v for k, v in lora_config.items() if k not in _VOLATILE_LORA_KEYS}
    payload = json.dumps(_canonical({"base": base, "lora": lora, "round": int(round_index)}), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class UpdateLimits:
    """What the server knows of its clients, to bound what they claim.

    max_num_examples: recipe cap on any client's ``num_examples`` (None: no cap).
    declared_sizes: the training-set size each client declared at enrolment; when non-empty, a client that is not
        in it was never enrolled and is rejected, and ``num_examples`` above the declared size is rejected.
    token_bounds: per client, the most tokens it can have routed through one layer in a round
        (``sum_e expert_counts[l, e]``); counts above it are rejected.
    fingerprint: the fingerprint the server announced for this round (None: not checked).
    """

    max_num_examples: int | None = None
    declared_sizes: dict[str, int] = field(default_factory=dict)
    token_bounds: dict[str, int] = field(default_factory=dict)
    fingerprint: str | None = None


def check_update(
    update: ClientUpdate, global_state: State, layout: ExpertLayout, limits: UpdateLimits | None = None
) -> None:
    """Raise `UpdateRejected` if `update` does not fit `global_state`, `layout` and `limits`."""
    limits = limits or UpdateLimits()
    cid = update.client_id
    problem = client_id_problem(cid)
    if problem:
        raise UpdateRejected(cid, problem)
    if limits.declared_sizes and cid not in limits.declared_sizes:
        raise UpdateRejected(cid, "was never enrolled (no declared size)")
    _check_num_examples(cid, update.num_examples, limits)
    if limits.fingerprint is not None:
        sent = getattr(update, "fingerprint", None)
        if sent is None:
            raise UpdateRejected(cid, "sent no fingerprint; the server announced one for this round")
        if sent != limits.fingerprint:
            raise UpdateRejected(
                cid, "fingerprint does not match this round's base model / adapter config (stale or foreign update)"
            )
    _check_state(cid, update.state, global_state, layout)
    _check_counts(cid, update.expert_counts, layout, limits.token_bounds.get(cid))


def _check_num_examples(cid: str, num_examples: object, limits: UpdateLimits) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        raise UpdateRejected(cid, f"num_examples must be a positive integer, got {num_examples!r}")
    if limits.max_num_examples is not None and num_examples > limits.max_num_examples:
        raise UpdateRejected(cid, f"num_examples {num_examples} exceeds the cap of {limits.max_num_examples}")
    declared = limits.declared_sizes.get(cid)
    if declared is not None and num_examples > declared:
        raise UpdateRejected(cid, f"num_examples {num_examples} exceeds its declared size {declared}")


def _check_state(cid: str, state: object, global_state: State, layout: ExpertLayout) -> None:
    if not isinstance(state, Mapping):
        raise UpdateRejected(cid, f"state must be a mapping of tensors, got {type(state).__name__}")
    missing = sorted(set(global_state) - set(state), key=str)
    extra = sorted(set(state) - set(global_state), key=str)
    if missing:
        raise UpdateRejected(cid, f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        raise UpdateRejected(cid, f"unexpected keys {extra[:3]}{'...' if len(extra) > 3 else ''}")
    expected = layout.expected_shapes()
    for key, reference in global_state.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise UpdateRejected(cid, f"{key} is a {type(tensor).__name__}, expected a torch.Tensor")
        if tensor.layout != torch.strided or tensor.device.type != reference.device.type:
            wanted = f"a dense {reference.device.type} tensor"
            raise UpdateRejected(cid, f"{key} must be {wanted}, got {tensor.layout} on {tensor.device}")
        if tuple(tensor.shape) != tuple(reference.shape):
            hint = ""
            if key in expected and tuple(reference.shape) == expected[key] and tensor.dim() == 2:
                pair = layout.pair_of(key)
                size = tensor.shape[0] if key == pair.a_key else tensor.shape[1]
                hint = f" (rank {size / pair.num_experts:g} differs from layout rank {pair.rank})"
            raise UpdateRejected(
                cid, f"{key} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}{hint}"
            )
        if tensor.dtype != reference.dtype:
            raise UpdateRejected(cid, f"{key} has dtype {tensor.dtype}, expected {reference.dtype}")
        if not _all_finite(tensor):
            raise UpdateRejected(cid, f"{key} contains NaN or Inf")


def _check_counts(cid: str, counts: object, layout: ExpertLayout, token_bound: int | None) -> None:
    if counts is None:
        return
    if not isinstance(counts, torch.Tensor) or counts.layout != torch.strided:
        raise UpdateRejected(cid, f"expert_counts must be a dense tensor, got {type(counts).__name__}")
    shape = (layout.num_layers, layout.num_experts)
    if tuple(counts.shape) != shape:
        raise UpdateRejected(cid, f"expert_counts has shape {tuple(counts.shape)}, expected {shape}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise UpdateRejected(cid, f"expert_counts must be integer token counts, got {counts.dtype}")
    if counts.device.type == "meta":
        raise UpdateRejected(cid, "expert_counts is a meta tensor (no values)")
    if (counts < 0).any():
        raise UpdateRejected(cid, "expert_counts contains negative counts")
    if token_bound is not None:
        routed = int(counts.to(torch.int64).sum(-1).max())
        if routed > token_bound:
            raise UpdateRejected(
                cid, f"expert_counts route {routed} tokens through one layer, more than the bound of {token_bound}"
            )


def partition_valid(
    updates: list[ClientUpdate], global_state: State, layout: ExpertLayout, limits: UpdateLimits | None = None
) -> tuple[list[ClientUpdate], dict[str, str]]:
    """Split updates into the accepted ones and ``{client_id: reason}`` for the rejected ones.

    A client id sent more than once rejects every copy (keyed ``"<id>"``): an impostor must not be able to
    replace the real client by arriving first, and the server cannot tell which copy is real.
    """
    accepted: list[ClientUpdate] = []
    rejected: dict[str, str] = {}
    ids = [rejection_key(getattr(u, "client_id", None)) for u in updates]
    duplicated = {cid for cid in ids if ids.count(cid) > 1}
    for update, key in zip(updates, ids):
        if key in duplicated:
            problem = f"duplicated client id (sent {ids.count(key)} times this round; every copy is rejected)"
            rejected[key] = str(UpdateRejected(getattr(update, "client_id", None), problem))
            continue
        try:
            if not isinstance(update, ClientUpdate):
                problem = f"not a ClientUpdate: {type(update).__name__}"
                raise UpdateRejected(getattr(update, "client_id", None), problem)
            check_update(update, global_state, layout, limits)
        except UpdateRejected as error:
            rejected[key] = str(error)
            continue
        accepted.append(update)
    return accepted, rejected


def rejection_key(client_id: object) -> str:
    """The diagnostics key of a client: its id when it is safe, else its escaped repr."""
    return client_id if client_id_problem(client_id) is None else _shown(client_id)


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN/Inf. A finite sum proves it in one cheap pass; only an overflowing sum
    (or a real NaN/Inf) pays for the element-wise check."""
    if not tensor.dtype.is_floating_point:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())
