"""What crosses the network, in Flower's records: adapter states, client updates, fingerprints.

Tensors travel as `ArrayRecord`s in the adapter's own dtype. NumPy has no bfloat16, so a bf16 tensor is
sent as its int16 bit pattern and the keys that need the view back are listed next to it; nothing is cast.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.aggregation.types import ClientUpdate, State
from hf_fcmoe.aggregation.validation import update_fingerprint
from hf_fcmoe.federation.flower.expert_slices import PackedState, pack_changed, unpack_changed

BF16_KEYS = "bf16_keys"
RELATIVE = "relative_to_reference"  # JSON {sliced key: [factor, num_experts]}: the state is sent as changes


def state_to_records(state: State) -> tuple[ArrayRecord, list[str]]:
    """An adapter state as an ArrayRecord, plus the keys sent as bf16 bit patterns."""
    bf16 = sorted(key for key, tensor in state.items() if tensor.dtype == torch.bfloat16)
    wire = {
        key: (tensor.view(torch.int16) if key in bf16 else tensor).detach().cpu().contiguous()
        for key, tensor in state.items()
    }
    return ArrayRecord(wire), bf16


def records_to_state(arrays: ArrayRecord, bf16_keys: list[str] | tuple[str, ...] = ()) -> State:
    state = dict(arrays.to_torch_state_dict())
    for key in bf16_keys:
        state[key] = state[key].view(torch.bfloat16)
    return state


def put_state(
    content: RecordDict, name: str, state: State, reference: State | None = None, layout: ExpertLayout | None = None
) -> None:
    """Store `state` under `name` (arrays) and `name.meta` (its bf16 keys) in a message's content.

    With `reference` (a state the receiver holds): only what differs from it is sent, down to the experts of a
    fused expert factor (`name.experts`: their indices); see expert_slices.py. `get_state` needs the same reference.
    """
    meta = {}
    if reference is not None:
        packed = pack_changed(state, reference, layout)
        state = packed.tensors
        meta[RELATIVE] = json.dumps(packed.factors, sort_keys=True)
        if packed.experts:
            content[f"{name}.experts"] = ArrayRecord({key: index for key, index in packed.experts.items()})
    arrays, bf16 = state_to_records(state)
    content[name] = arrays
    content[f"{name}.meta"] = ConfigRecord({BF16_KEYS: ",".join(bf16), **meta})


def get_state(content: RecordDict, name: str, reference: State | None = None) -> State | None:
    """The state under `name` (None if absent); one sent relative to a reference is rebuilt on `reference`."""
    if name not in content:
        return None
    meta = content.get(f"{name}.meta")
    bf16 = [key for key in str(meta[BF16_KEYS]).split(",") if key] if meta is not None and BF16_KEYS in meta else []
    state = records_to_state(content[name], bf16)
    if meta is None or RELATIVE not in meta:
        return state
    if reference is None:
        raise ValueError(f"{name!r} was sent relative to a state this side does not hold")
    factors = {key: (str(factor), int(num)) for key, (factor, num) in json.loads(str(meta[RELATIVE])).items()}
    experts = dict(content[f"{name}.experts"].to_torch_state_dict()) if f"{name}.experts" in content else {}
    if set(factors) != set(experts):
        raise ValueError(f"{name!r}: expert indices do not match the sliced tensors")
    return unpack_changed(PackedState(state, experts, factors), reference)


def state_bytes(content: RecordDict, name: str) -> int:
    """Bytes of `name` in a message as `ArrayRecord.count_bytes` counts them (tensors and expert indices)."""
    total = content[name].count_bytes() if name in content else 0
    return total + (content[f"{name}.experts"].count_bytes() if f"{name}.experts" in content else 0)


def state_wire_bytes(state: State) -> int:
    """Bytes of the ArrayRecord that carries `state` (tensor payload plus NumPy's per-array header)."""
    return state_to_records(state)[0].count_bytes()


def fingerprint(model_config, lora_config) -> str:
    """What makes two adapters exchangeable, short: the hub's `update_fingerprint` of the base config and the
    LoraConfig (paths, dtypes and versions left out). A node is checked with it when it joins and at every message;
    each update then carries the round's full fingerprint, which the `AggregationHub` checks (`announce`)."""
    return update_fingerprint(model_config.to_dict(), lora_config.to_dict(), 0)[:16]


def update_to_content(
    update: ClientUpdate, node_fingerprint: str, start: State | None = None, layout: ExpertLayout | None = None
) -> RecordDict:
    """A train reply: the update's state, and per client (not averaged) its sizes, counts and loss.

    With `start` (the global the round started from, which the server holds): only the tensors and expert
    slices that differ from it are sent."""
    content = RecordDict()
    put_state(content, "update", update.state, start, layout)
    metrics = {"num_examples": int(update.num_examples)}
    if update.train_loss is not None:
        metrics["train_loss"] = float(update.train_loss)
    metrics.update({key: value for key, value in update.metrics.items() if isinstance(value, (int, float))})
    content["metrics"] = MetricRecord(metrics)
    if update.expert_counts is not None:
        content["expert_counts"] = ArrayRecord({"counts": update.expert_counts.to(torch.int64).contiguous()})
    client = {"client_id": update.client_id, "fingerprint": node_fingerprint}
    if update.fingerprint is not None:  # the round's fingerprint the hub checks (federation/safeguards.py)
        client["update_fingerprint"] = update.fingerprint
    content["client"] = ConfigRecord(client)
    return content


def content_to_update(content: RecordDict, start: State | None = None) -> tuple[ClientUpdate, str]:
    """The `ClientUpdate` of a train reply and the fingerprint the node reported; KeyError if a part is missing,
    ValueError if what was sent does not fit `start` (the global the round started from)."""
    client = content["client"]
    metrics = dict(content["metrics"])
    counts = None
    if "expert_counts" in content:
        counts = content["expert_counts"].to_torch_state_dict()["counts"]
    num_examples = metrics.pop("num_examples")
    train_loss = metrics.pop("train_loss", None)
    update = ClientUpdate(
        client_id=str(client["client_id"]),
        state=get_state(content, "update", start),
        num_examples=num_examples,
        expert_counts=counts,
        train_loss=train_loss,
        metrics=metrics,
        fingerprint=str(client["update_fingerprint"]) if "update_fingerprint" in client else None,
    )
    return update, str(client["fingerprint"])
