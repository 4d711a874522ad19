"""The Flower engine's parts without a deployment: records, fingerprints, node settings and state, the
strategy's validation (every bad reply rejected with a reason naming the client), the engine guard."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402

from hf_fcmoe.adapters.lora import build_lora_config, expert_layout_from_configs  # noqa: E402
from hf_fcmoe.aggregation import ClientUpdate, update_fingerprint  # noqa: E402
from hf_fcmoe.federation.flower.codec import (  # noqa: E402
    content_to_update,
    fingerprint,
    get_state,
    put_state,
    update_to_content,
)
from hf_fcmoe.federation.flower.node import NodeSettings, NodeStore, load_node_data  # noqa: E402
from hf_fcmoe.federation.flower.strategy import FCMoEStrategy  # noqa: E402
from hf_fcmoe.federation.server_state import build_hub  # noqa: E402
from hf_fcmoe.models.families import get_family, tiny_moe_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_layout():
    model_config = tiny_moe_config("mixtral")
    lora_config = build_lora_config(get_family(model_config), 4, 8, ["experts", "router"])
    return model_config, lora_config, expert_layout_from_configs(model_config, lora_config)


def _state(layout, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator).to(dtype) * 0.01
        for key, shape in layout.expected_shapes().items()
    }


def test_state_records_round_trip_exactly_in_the_adapter_dtype(tiny_layout):
    layout = tiny_layout[2]
    for dtype in (torch.float32, torch.bfloat16):
        state = _state(layout, 0, dtype)
        content = RecordDict()
        put_state(content, "global", state)
        back = get_state(content, "global")
        assert set(back) == set(state)
        for key, tensor in state.items():
            assert back[key].dtype == dtype and torch.equal(back[key], tensor), key
    assert get_state(RecordDict(), "global") is None


def test_update_reply_keeps_per_client_numbers(tiny_layout):
    layout = tiny_layout[2]
    counts = torch.arange(layout.num_layers * layout.num_experts, dtype=torch.int64).view(
        layout.num_layers, layout.num_experts
    )
    update = ClientUpdate("client_007", _state(layout, 1), 33, counts, 1.25, {"global_step": 4})
    back, node_fingerprint = content_to_update(update_to_content(update, "abc"))
    assert node_fingerprint == "abc" and back.client_id == "client_007"
    assert back.num_examples == 33 and isinstance(back.num_examples, int) and back.train_loss == 1.25
    assert torch.equal(back.expert_counts, counts) and back.expert_counts.dtype == torch.int64
    assert back.metrics == {"global_step": 4}
    assert all(torch.equal(back.state[k], v) for k, v in update.state.items())


def test_fingerprint_names_architecture_and_lora_not_paths(tiny_layout):
    model_config, lora_config, _ = tiny_layout
    reference = fingerprint(model_config, lora_config)
    # a saved copy of the same base (save_pretrained adds `architectures`) loaded from another folder
    saved = {**model_config.to_dict(), "_name_or_path": "/elsewhere", "architectures": ["MixtralForCausalLM"]}
    moved = model_config.__class__(**saved)
    assert fingerprint(moved, lora_config) == reference
    other_rank = build_lora_config(get_family(model_config), 8, 8, ["experts", "router"])
    assert fingerprint(model_config, other_rank) != reference
    wider = tiny_moe_config("mixtral", hidden_size=model_config.hidden_size * 2)
    assert fingerprint(wider, lora_config) != reference


def test_node_settings_reject_unknown_and_missing_keys(tmp_path):
    good = {"client-id": "a", "train-data": str(tmp_path / "t.jsonl"), "state-dir": str(tmp_path / "s")}
    assert NodeSettings.from_node_config(good).client_id == "a"
    with pytest.raises(ValueError, match=r"unknown node-config key\(s\) \['train_data'\]"):
        NodeSettings.from_node_config({**good, "train_data": "x"})
    with pytest.raises(ValueError, match=r"lacks \['state-dir'\]"):
        NodeSettings.from_node_config({k: v for k, v in good.items() if k != "state-dir"})


def test_node_data_errors_name_the_file(tmp_path, tiny_run_config):
    config = tiny_run_config()
    settings = NodeSettings(client_id="a", train_data=tmp_path / "missing.jsonl", state_dir=tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="train-data .*missing.jsonl.* does not exist"):
        load_node_data(settings, config)
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(10)))
    settings.train_data = no_text
    with pytest.raises(ValueError, match="no usable text column"):
        load_node_data(settings, config)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    settings.train_data = rows
    train, held_out = load_node_data(settings, config)
    assert len(train) + len(held_out) == 10 and len(held_out) == 2


def test_node_store_keeps_residuals_per_round(tmp_path):
    store = NodeStore(tmp_path / "state")
    assert store.residual_before(1) is None
    for round_index in (1, 2, 3):
        store.save_residual(round_index, {"w": torch.full((2,), float(round_index))})
    assert store.residual_before(4)["w"][0] == 3.0
    assert store.residual_before(3)["w"][0] == 2.0  # a resumed round 3 starts from round 2's residual
    assert store.residual_before(2) is None  # only the last rounds are kept
    assert sorted(p.name for p in store.root.iterdir()) == ["residual-2.safetensors", "residual-3.safetensors"]


@pytest.fixture
def serverapp_identity(monkeypatch):
    """The task identity a flwr-serverapp process has (messages are stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 2), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _strategy(config, layout, fingerprint_value="fp"):
    hub = build_hub(config, layout)
    strategy = FCMoEStrategy(
        hub,
        ["client_000", "client_001", "client_002", "client_003", "client_004"],
        per_round=5,
        seed=0,
        instruction={"recipe": "", "fingerprint": fingerprint_value, "run_key": "k"},
        personal_scale=0.5,
        keeps_own_state=False,
    )
    strategy.nodes = {cid: 100 + i for i, cid in enumerate(strategy.client_ids)}
    return strategy


def _sent(messages):
    for message in messages:  # what Grid.push_messages does before sending
        message.metadata.__dict__["_message_id"] = message.object_id
    return {message.metadata.dst_node_id: message for message in messages}


def test_strategy_rejects_bad_replies_by_name_and_aggregates_the_rest(
    tiny_run_config, tiny_layout, serverapp_identity
):
    model_config, lora_config, layout = tiny_layout
    config = tiny_run_config(aggregation_method="fedavg")
    strategy = _strategy(config, layout)
    configs = (model_config.to_dict(), lora_config.to_dict())
    strategy.hub.announce(*configs)  # as the ServerApp does: the hub checks each update's round fingerprint
    round_1 = update_fingerprint(*configs, 1)
    global_state = _state(layout, 0)
    strategy.global_state = global_state
    messages = _sent(strategy.configure_train(1, None, ConfigRecord(), None))
    assert sorted(messages) == [100, 101, 102, 103, 104]
    first = messages[100]
    assert (
        int(first.content["instruction"]["round"]) == 1
        and get_state(first.content, "global").keys() == global_state.keys()
    )
    good = ClientUpdate("client_000", _state(layout, 5), 10, fingerprint=round_1)
    nan_state = _state(layout, 6)
    nan_state[next(iter(nan_state))][0, 0] = float("nan")
    replies = [
        Message(content=update_to_content(good, "fp"), reply_to=messages[100]),
        Message(
            content=RecordDict(
                {"rejected": ConfigRecord({"client_id": "client_001", "reason": "train-data 'x' does not exist"})}
            ),
            reply_to=messages[101],
        ),
        Message(error=Error(code=1, reason="node went away"), reply_to=messages[102]),
        Message(
            # trained from another round's configs (stale or foreign)
            content=update_to_content(
                ClientUpdate("client_003", _state(layout, 7), 10, fingerprint=update_fingerprint(*configs, 0)), "fp"
            ),
            reply_to=messages[103],
        ),
        Message(
            content=update_to_content(ClientUpdate("client_004", nan_state, 10, fingerprint=round_1), "fp"),
            reply_to=messages[104],
        ),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    rejected = strategy.outcome.rejected
    assert sorted(rejected) == ["client_001", "client_003", "client_004"]
    assert "does not exist" in rejected["client_001"] and "node 101" in rejected["client_001"]
    assert "node went away" in strategy.outcome.missing["client_002"]
    assert "fingerprint does not match" in rejected["client_003"]
    assert "NaN" in rejected["client_004"]
    assert [u.client_id for u in strategy.outcome.updates] == ["client_000"]
    expected = build_hub(config, layout).aggregate(global_state, [good], round=1).global_state
    assert all(torch.equal(strategy.global_state[k], expected[k]) for k in expected)
    # the reply carries the update's fingerprint for the hub
    assert content_to_update(update_to_content(good, "fp"))[0].fingerprint == round_1


def test_strategy_keeps_the_global_when_every_reply_is_bad(tiny_run_config, tiny_layout, serverapp_identity):
    layout = tiny_layout[2]
    strategy = _strategy(tiny_run_config(aggregation_method="fedavg"), layout)
    global_state = _state(layout, 0)
    strategy.global_state = global_state
    strategy.nodes.pop("client_004")  # no live node: the round names it as missing
    messages = _sent(strategy.configure_train(1, None, ConfigRecord(), None))
    bad = RecordDict({"rejected": ConfigRecord({"client_id": "?", "reason": "no text column"})})
    replies = [Message(content=bad, reply_to=m) for m in messages.values()]
    strategy.aggregate_train(1, replies)
    assert strategy.outcome.result.failed and strategy.global_state is global_state
    assert len(strategy.outcome.rejected) == 4
    assert strategy.outcome.missing == {"client_004": "no live SuperNode for this client"}


def test_simulate_refuses_a_flower_recipe(tmp_path, capsys):
    from hf_fcmoe.cli import main

    out = tmp_path / "run"
    code = main(["simulate", "--config", "recipes/flower/tiny_fcmoe.yaml", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "engine 'flower'" in err and "recipes/flower/README.md" in err
    assert not out.exists()


def test_server_run_config_is_checked(tmp_path):
    from hf_fcmoe.federation.flower.server_app import server_config

    with pytest.raises(ValueError, match=r"unknown run-config key\(s\) \['recipes'\]"):
        server_config({"recipes": "x.yaml"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="recipe .*nope.yaml.* does not exist"):
        server_config({"recipe": "nope.yaml"}, tmp_path)


def test_wire_size_from_shapes_matches_the_records_sent(tiny_layout):
    from hf_fcmoe.federation.flower.codec import state_wire_bytes
    from hf_fcmoe.federation.flower.wire_size import array_record_bytes

    layout = tiny_layout[2]
    for dtype in (torch.float32, torch.bfloat16):
        assert array_record_bytes(layout.expected_shapes(), dtype) == state_wire_bytes(_state(layout, 0, dtype))


@pytest.mark.slow
def test_a_node_trains_its_round_with_accelerate_on_two_cpu_processes(tmp_path, tiny_run_config):
    """The multi-GPU node path on CPU: `accelerate launch` with 2 gloo processes, adapters exchanged as files."""
    from dataclasses import replace

    import yaml

    from hf_fcmoe.federation.flower.client_app import NodeSession, train_with_accelerate
    from hf_fcmoe.federation.flower.export_data import export_client_data
    from hf_fcmoe.models.loading import load_base_model
    from hf_fcmoe.training.trainer import adapter_state

    config = tiny_run_config(engine="flower", max_steps=2)
    folder = export_client_data(config, tmp_path / "data")["client_000"]
    recipe = yaml.safe_dump(config.to_yaml_dict())
    model, _ = load_base_model(config.model_name_or_path, seed=config.seed)
    lora_config = build_lora_config(get_family(model.config), config.lora_r, config.lora_alpha, config.lora_targets)
    expected = fingerprint(model.config, lora_config)
    settings = NodeSettings(
        "client_000", folder / "train.jsonl", tmp_path / "state", folder / "eval.jsonl", num_processes=2
    )
    here = NodeSession(replace(settings, num_processes=1), recipe, expected)
    start = adapter_state(here.worker.model)
    single = here.worker.train("client_000", here.splits, start, seed=5)
    launched = train_with_accelerate(NodeSession(settings, recipe, expected, with_model=False), start, None, 5, recipe)
    assert launched.metrics["num_processes"] == 2 and launched.client_id == "client_000"
    assert launched.num_examples == single.num_examples
    assert set(launched.state) == set(start)
    assert all(launched.state[k].shape == start[k].shape and launched.state[k].dtype == start[k].dtype for k in start)
    assert any(not torch.equal(launched.state[k], start[k]) for k in start), "the launched round changed nothing"
    # both ranks' routed tokens are summed: two ranks train twice the batches of one process (padding differs)
    assert launched.expert_counts.shape == single.expert_counts.shape
    assert int(launched.expert_counts.sum()) > 1.5 * int(single.expert_counts.sum())
    assert not list((tmp_path / "state").glob("local_round_*")), "the exchange folder was not cleaned up"


class _FakeGrid:
    """Answers query messages as three nodes would: a good one, one with bad data, one with another base."""

    def __init__(self, answers):
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        _sent(messages)
        return [Message(content=self.answers[m.metadata.dst_node_id], reply_to=m) for m in messages]


def test_server_admits_good_nodes_and_names_refused_ones(tiny_run_config, serverapp_identity):
    from hf_fcmoe.federation.flower.server_app import FlowerFederation

    federation = FlowerFederation(tiny_run_config(engine="flower", num_clients=1), wait_timeout=5, min_nodes=1)
    strategy = federation._strategy([], "key")
    good = ConfigRecord({"client_id": "client_000", "fingerprint": federation.fingerprint})
    data = MetricRecord({"train_rows": 40, "eval_rows": 10, "num_processes": 2})
    answers = {
        11: RecordDict({"client": good, "data": data}),
        12: RecordDict({"rejected": ConfigRecord({"client_id": "client_001", "reason": "no usable text column"})}),
        13: RecordDict({"client": ConfigRecord({"client_id": "client_002", "fingerprint": "0000"})}),
    }
    federation.refresh_nodes(_FakeGrid(answers), strategy, None, wait=True)
    assert strategy.nodes == {"client_000": 11}
    assert "no usable text column" in federation.join_rejected["client_001"]
    assert "node 12" in federation.join_rejected["client_001"]
    assert "fingerprint 0000" in federation.join_rejected["client_002"]
    assert set(federation.refused) == {12, 13}
    # enrolled with the hub as in-process: declared size, routed-token bound of its 2 processes
    assert federation.hub.declared_sizes == {"client_000": 40}
    config = federation.config
    bound = 2 * config.per_device_train_batch_size * config.max_steps * config.max_length * 2  # top_k 2
    assert federation.hub.token_bounds == {"client_000": bound * config.gradient_accumulation_steps}
    assert not (federation.run_dir.root / "metrics.jsonl").exists(), "nothing is written before the run starts"


def test_server_starts_from_a_saved_initial_adapter_without_base_weights(tmp_path, tiny_run_config):
    """A Hub/local base: the server reads only its config; the first global and fingerprint match a full load."""
    from hf_fcmoe.federation.flower.initial_adapter import draw_initial_adapter, load_initial_adapter
    from hf_fcmoe.federation.run_dir import save_adapter_folder
    from hf_fcmoe.models.loading import load_base_model, save_base_model

    model, tokenizer = load_base_model("tiny:mixtral", seed=0)
    base = save_base_model(model, tokenizer, tmp_path / "base")
    config = tiny_run_config(engine="flower", model_name_or_path=base)
    drawn = draw_initial_adapter(config)
    save_adapter_folder(tmp_path / "initial", drawn.initial_state, drawn.lora_config)
    loaded = load_initial_adapter(config, tmp_path / "initial")
    assert all(torch.equal(loaded.initial_state[k], v) for k, v in drawn.initial_state.items())
    assert loaded.layout.expected_shapes() == drawn.layout.expected_shapes()
    assert fingerprint(loaded.model_config, loaded.lora_config) == fingerprint(drawn.model_config, drawn.lora_config)
    other = tiny_run_config(engine="flower", model_name_or_path=base, lora_r=4)
    with pytest.raises(ValueError, match="does not match the recipe's LoRA"):
        load_initial_adapter(other, tmp_path / "initial")


def test_train_messages_skip_the_global_a_node_already_holds(tiny_run_config, tiny_layout, serverapp_identity):
    """After a node acknowledged round t's evaluate message (which carried the global), round t+1's train
    message carries only the instruction; the node forms its start state from its own copy."""
    layout = tiny_layout[2]
    strategy = _strategy(tiny_run_config(aggregation_method="fedavg"), layout)
    strategy.global_state = _state(layout, 0)
    messages = _sent(strategy.configure_evaluate(1, None, ConfigRecord(), None))
    assert all("global" in m.content for m in messages.values())
    scores = RecordDict(
        {
            "scores": MetricRecord(
                {"global_nll_sum": 2.0, "global_tokens": 1, "local_nll_sum": 2.0, "local_tokens": 1, "eval_rows": 1}
            )
        }
    )
    replies = [Message(content=scores, reply_to=m) for node, m in messages.items() if node != 104]
    replies.append(Message(error=Error(code=1, reason="gone"), reply_to=messages[104]))
    strategy.aggregate_evaluate(1, replies)
    assert "client_004" in strategy.eval_missing
    train = _sent(strategy.configure_train(2, None, ConfigRecord(), None))
    assert [node for node, m in train.items() if "global" in m.content] == [104]
    assert all(int(m.content["instruction"]["global_round"]) == 1 for node, m in train.items() if node != 104)
