"""Only what changed crosses the network: adapter states relative to a state the receiver holds, down to the
experts inside PEFT's fused expert factors. Packing and unpacking are bit-exact; untouched experts are not sent."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402

from hf_fcmoe.adapters.lora import build_lora_config, expert_layout_from_configs  # noqa: E402
from hf_fcmoe.aggregation import AggregationResult, ClientUpdate  # noqa: E402
from hf_fcmoe.federation.flower.codec import (  # noqa: E402
    content_to_update,
    get_state,
    put_state,
    state_bytes,
    update_to_content,
)
from hf_fcmoe.federation.flower.expert_slices import same_bits  # noqa: E402
from hf_fcmoe.federation.flower.strategy import RoundOutcome  # noqa: E402
from hf_fcmoe.federation.flower.wire_size import sliced_reply_bytes  # noqa: E402
from hf_fcmoe.federation.server_state import build_hub  # noqa: E402
from hf_fcmoe.models.families import get_family, tiny_moe_config  # noqa: E402
from tests.test_flower import _sent, _state, _strategy, serverapp_identity  # noqa: E402, F401


@pytest.fixture(scope="module")
def layout():
    model_config = tiny_moe_config("mixtral")
    lora_config = build_lora_config(get_family(model_config), 4, 8, ["experts", "router", "attention"])
    return expert_layout_from_configs(model_config, lora_config)


def _touch(state: dict, layout, experts: dict[int, list[int]], generator) -> dict:
    """A copy of `state` whose expert factors changed only for `experts[layer]` (router/attention: all changed)."""
    out = {key: tensor.clone() for key, tensor in state.items()}
    for pair in layout.pairs:
        if pair.kind != "expert":
            for key in (pair.a_key, pair.b_key):
                out[key] += torch.randn(out[key].shape, generator=generator).to(out[key].dtype)
            continue
        b, a = pair.expert_factors(out)  # views into `out`
        for e in experts.get(pair.layer, []):
            a[e] += torch.randn(a[e].shape, generator=generator).to(a.dtype)
            b[e] += torch.randn(b[e].shape, generator=generator).to(b.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_touched_experts_are_sent_and_reassembled_bit_exactly(layout, dtype):
    generator = torch.Generator().manual_seed(0)
    reference = _state(layout, 0, dtype)
    touched = {0: [1, 3], 1: [2]}
    state = _touch(reference, layout, touched, generator)
    first_a = layout.by_kind("expert")[0].a_key
    content = RecordDict()
    put_state(content, "update", state, reference, layout)
    back = get_state(content, "update", reference)
    assert set(back) == set(state) and all(same_bits(back[k], state[k]) for k in state)
    sent = content["update.experts"].to_torch_state_dict()
    for pair in layout.by_kind("expert"):
        for key in (pair.a_key, pair.b_key):
            assert sent[key].tolist() == touched[pair.layer], key  # untouched experts are not on the wire
    whole = RecordDict()
    put_state(whole, "update", state)
    expected = sliced_reply_bytes(layout, {layer: len(experts) for layer, experts in touched.items()}, dtype)
    assert state_bytes(content, "update") == expected < whole["update"].count_bytes()  # what wire_size prints
    # an unchanged tensor is left out altogether; a sign flip of a zero is a change (bit patterns, not values)
    same = dict(state)
    same[first_a] = reference[first_a].clone()
    flipped = {k: v.clone() for k, v in reference.items()}
    flipped[first_a] = torch.zeros_like(reference[first_a])
    zero_ref = {**reference, first_a: torch.zeros_like(reference[first_a])}
    flipped[first_a][0, 0] = -0.0
    for candidate, ref in ((same, reference), (flipped, zero_ref)):
        record = RecordDict()
        put_state(record, "update", candidate, ref, layout)
        assert all(same_bits(v, candidate[k]) for k, v in get_state(record, "update", ref).items())
    record = RecordDict()
    put_state(record, "update", same, reference, layout)
    assert first_a not in record["update"]


def test_a_relative_state_needs_its_reference_and_bad_indices_are_refused(layout):
    reference = _state(layout, 0)
    state = _touch(reference, layout, {0: [0]}, torch.Generator().manual_seed(1))
    content = RecordDict()
    put_state(content, "update", state, reference, layout)
    with pytest.raises(ValueError, match="sent relative to a state"):
        get_state(content, "update")
    key = layout.by_kind("expert")[0].a_key
    experts = content["update.experts"].to_torch_state_dict()
    for bad in (torch.tensor([7], dtype=torch.int64), torch.tensor([0, 0], dtype=torch.int64)):
        from flwr.app import ArrayRecord

        content["update.experts"] = ArrayRecord({**experts, key: bad})
        with pytest.raises(ValueError, match="bad expert indices|do not fit"):
            get_state(content, "update", reference)


@pytest.mark.usefixtures("serverapp_identity")
def test_strategy_aggregates_a_sliced_reply_as_the_whole_one(tiny_run_config, layout):
    """The server rebuilds a reply sent as changed experts on the global it sent, and aggregates exactly that;
    a reply that does not fit is rejected with a reason naming the client."""
    config = tiny_run_config(aggregation_method="fedavg")
    strategy = _strategy(config, layout)
    strategy.global_state = global_state = _state(layout, 0)
    messages = _sent(strategy.configure_train(1, None, ConfigRecord(), None))
    generator = torch.Generator().manual_seed(2)
    updates = [
        ClientUpdate(cid, _touch(global_state, layout, {0: [i % 4], 1: [(i + 1) % 4]}, generator), 10 + i)
        for i, cid in enumerate(strategy.client_ids)
    ]
    replies = [
        Message(content=update_to_content(u, "fp", start=global_state, layout=layout), reply_to=messages[100 + i])
        for i, u in enumerate(updates[:4])
    ]
    bad = update_to_content(updates[4], "fp", start=global_state, layout=layout)  # then its indices get lost
    bad["update.experts"] = bad["update.experts"].__class__(
        {k: v[:0] for k, v in bad["update.experts"].to_torch_state_dict().items()}
    )
    replies.append(Message(content=bad, reply_to=messages[104]))
    strategy.aggregate_train(1, replies)
    assert (
        list(strategy.outcome.rejected) == ["client_004"] and "do not fit" in strategy.outcome.rejected["client_004"]
    )
    expected = build_hub(config, layout).aggregate(global_state, updates[:4], round=1).global_state
    assert all(torch.equal(strategy.global_state[k], expected[k]) for k in expected)
    full = sum(RecordDict({"x": update_to_content(u, "fp")["update"]})["x"].count_bytes() for u in updates[:4])
    assert 0 < strategy.outcome.bytes_up < full


@pytest.mark.usefixtures("serverapp_identity")
def test_evaluate_message_sends_only_conflicting_expert_slices_of_a_residual(tiny_run_config, layout):
    strategy = _strategy(tiny_run_config(aggregation_method="fcmoe"), layout)
    strategy.global_state = global_state = _state(layout, 0)
    residual = {key: torch.zeros_like(tensor) for key, tensor in global_state.items()}
    pair = layout.by_kind("expert")[1]
    b, a = pair.expert_factors(residual)
    a[2] += 0.5
    b[2] -= 0.25
    strategy.outcome = RoundOutcome(AggregationResult(global_state, residuals={"client_000": residual}), [])
    messages = _sent(strategy.configure_evaluate(1, None, ConfigRecord(), None))
    content = messages[100].content
    assert sorted(content["residual"].keys()) == sorted([pair.a_key, pair.b_key])
    assert tuple(content["residual"][pair.a_key].shape) == (1, *a.shape[1:])
    zeros = {key: torch.zeros_like(tensor) for key, tensor in global_state.items()}
    back = get_state(content, "residual", zeros)
    assert all(same_bits(back[k], residual[k]) for k in residual)
    assert "residual" not in messages[101].content


def test_a_real_local_round_sends_no_slice_of_an_expert_that_routed_no_token(tmp_path):
    """With weight decay 0 an expert without tokens comes back bit for bit; with weight decay it moves and is sent."""
    from hf_fcmoe.adapters.lora import expert_layout_from_peft_model
    from hf_fcmoe.data.synthetic import synthetic_domains
    from hf_fcmoe.training.trainer import FederatedMoETrainer, adapter_state
    from tests.test_trainer import NEVER_ROUTED, _args, _forbid_expert, _model

    for weight_decay in (0.0, 0.1):
        peft_model, tokenizer = _model()
        _forbid_expert(peft_model, layer=0, expert=NEVER_ROUTED)
        model_layout = expert_layout_from_peft_model(peft_model)
        start = adapter_state(peft_model)
        trainer = FederatedMoETrainer(
            peft_model,
            args=_args(tmp_path, weight_decay=weight_decay, max_steps=2),
            train_dataset=synthetic_domains(32),
            processing_class=tokenizer,
            start_state=start,
        )
        update = trainer.train_round()
        assert update.expert_counts[0, NEVER_ROUTED] == 0
        content = update_to_content(update, "fp", start=start, layout=model_layout)
        back, _ = content_to_update(content, start)
        assert all(same_bits(back.state[k], update.state[k]) for k in update.state)
        sliced = content["update.experts"].to_torch_state_dict() if "update.experts" in content else {}
        # A factors (B starts at 0, which weight decay leaves at 0)
        layer0 = [p.a_key for p in model_layout.by_kind("expert") if p.layer == 0]
        for key in layer0:
            if weight_decay == 0:
                assert NEVER_ROUTED not in sliced[key].tolist(), key
            else:
                assert key not in sliced and tuple(content["update"][key].shape) == tuple(start[key].shape), key
