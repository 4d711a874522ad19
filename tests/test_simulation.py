"""The in-process engine end to end: run directory contract, reloading, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from hf_fcmoe.adapters.loading import load_adapter_model
from hf_fcmoe.data.federated import load_federated_data
from hf_fcmoe.federation.client import ClientWorker
from hf_fcmoe.federation.run_dir import RunDirectory, load_adapter_weights
from hf_fcmoe.federation.simulation import FederatedSimulation, run_simulation
from hf_fcmoe.metrics.loss import nll_sum_and_count


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from hf_fcmoe.config import load_config
    from tests.conftest import TINY_RUN

    config = load_config(overrides={**TINY_RUN, "output_dir": str(tmp_path_factory.mktemp("sim") / "run")})
    return config, run_simulation(config)


def test_run_directory_contract(finished_run):
    config, result = finished_run
    root = result.output_dir
    for path in [
        "config.yaml",
        "state.json",
        "metrics.jsonl",
        "report.md",
        "plots/loss.png",
        "global/adapter_config.json",
        "global/adapter_model.safetensors",
    ]:
        assert (root / path).exists(), path
    assert json.loads((root / "state.json").read_text())["last_round"] == config.num_rounds
    for round_index in range(config.num_rounds + 1):
        assert (root / "rounds" / str(round_index) / "global" / "adapter_model.safetensors").exists()
    client_dir = root / "rounds" / "1" / "clients" / "client_000"
    stats = json.loads((client_dir / "stats.json").read_text())
    assert stats["num_examples"] > 0 and len(stats["expert_counts"]) == 2
    assert sorted(p.name for p in (root / "personalized").iterdir()) == ["client_000", "client_001", "client_002"]
    rows = result.metrics
    assert [row["round"] for row in rows] == list(range(config.num_rounds + 1))
    for field in (
        "round",
        "method",
        "global_eval_loss",
        "local_eval_loss",
        "local_eval_loss_per_client",
        "bytes_up",
        "bytes_down",
        "seconds",
    ):
        assert field in rows[-1], field
    assert rows[-1]["global_eval_loss"] < rows[0]["global_eval_loss"], "training did not reduce the eval loss"
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] == rows[1]["bytes_up"]


def test_saved_adapters_load_alone_and_reproduce_eval_loss(finished_run):
    config, result = finished_run
    data = load_federated_data(config.data_spec())
    expected = result.metrics[-1]
    for folder, field in [
        (result.global_dir, "global_eval_loss_per_client"),
        (result.personalized_dirs["client_001"], "local_eval_loss_per_client"),
    ]:
        model = load_adapter_model(folder)  # nothing else given: the base is found next to the adapter
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        worker = ClientWorker(model, tokenizer, config)
        splits = worker.prepare(data.train["client_001"], data.eval["client_001"])
        total, count = nll_sum_and_count(model, splits.eval, worker.collator)
        assert total / count == pytest.approx(expected[field]["client_001"], rel=1e-5)


def test_resume_equals_uninterrupted(finished_run, tiny_run_config):
    config, result = finished_run

    class Interrupt(Exception):
        pass

    def stop_after_first(round_index, row):
        if round_index == 1:
            raise Interrupt

    interrupted = tiny_run_config("interrupted", overwrite_output_dir=True)  # how it started is not compared
    with pytest.raises(Interrupt):
        run_simulation(interrupted, on_round_end=stop_after_first)
    assert json.loads(open(f"{interrupted.output_dir}/state.json").read())["last_round"] == 1
    resumed = run_simulation(tiny_run_config("interrupted"), resume=True)
    reference = load_adapter_weights(result.global_dir)
    final = load_adapter_weights(resumed.global_dir)
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=0, atol=0)
    assert [row["round"] for row in resumed.metrics] == [0, 1, 2]
    assert resumed.metrics[-1]["global_eval_loss"] == pytest.approx(result.metrics[-1]["global_eval_loss"])


def test_completed_rounds_are_never_overwritten(tiny_run_config):
    config = tiny_run_config("guarded", num_rounds=1)
    run_simulation(config)
    before = open(f"{config.output_dir}/rounds/1/global/adapter_model.safetensors", "rb").read()
    with pytest.raises(FileExistsError, match="already holds a run"):
        FederatedSimulation(tiny_run_config("guarded", num_rounds=1))

    class Boom(Exception):
        pass

    simulation = FederatedSimulation(tiny_run_config("guarded", num_rounds=2), resume=True)
    simulation.hub.aggregate = lambda *args, **kwargs: (_ for _ in ()).throw(Boom())
    with pytest.raises(Boom):
        simulation.run()
    after = open(f"{config.output_dir}/rounds/1/global/adapter_model.safetensors", "rb").read()
    assert before == after
    assert json.loads(open(f"{config.output_dir}/state.json").read())["last_round"] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"clients_per_round": 5}, "clients_per_round=5"),
        (
            {"num_examples": 3, "num_clients": 3, "partition": "iid", "min_partition_size": 1},
            "client_000 .*no training rows",
        ),
        ({"aggregation_method": "median"}, "'median'"),
    ],
)
def test_bad_input_fails_before_training(tiny_run_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        FederatedSimulation(tiny_run_config("bad", **overrides))


def test_unknown_recipe_key_is_named(tmp_path):
    from hf_fcmoe.config import load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: x\nnum_round: 3\n")
    with pytest.raises(ValueError, match=r"unknown key num_round in recipe .*; did you mean num_rounds\?"):
        load_config(recipe)


def test_dataset_without_text_column_is_named(tiny_run_config, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": f"row {i}", "label": i % 2}) + "\n" for i in range(64)))
    with pytest.raises(ValueError, match="no usable text column.*'body'"):
        FederatedSimulation(tiny_run_config("nocol", dataset_name=str(path), num_examples=None))


def test_dense_base_model_is_refused(tiny_run_config, tmp_path, dense_config):
    dense_config.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="'llama' is not a supported Mixture-of-Experts"):
        FederatedSimulation(tiny_run_config("dense", model_name_or_path=str(tmp_path / "dense")))


def test_fcmoe_personalized_is_global_plus_lambda_residual(tiny_run_config):
    config = tiny_run_config("fcmoe", aggregation_method="fcmoe", retention_lambda=0.5)
    result = run_simulation(config)
    root = result.output_dir
    global_state = load_adapter_weights(result.global_dir)
    residual_dir = root / "rounds" / str(config.num_rounds) / "residuals"
    residual_files = sorted(residual_dir.glob("*.safetensors"))
    assert residual_files, "fcmoe with retention kept no residuals"
    for path in residual_files:
        residual = RunDirectory.load_tensors(path)
        personalized = load_adapter_weights(result.personalized_dirs[path.stem])
        for key, tensor in global_state.items():
            torch.testing.assert_close(personalized[key], tensor + 0.5 * residual[key], rtol=0, atol=1e-7)
    last = result.metrics[-1]
    assert len(last["conflict_rate_per_layer"]) == 2 and 0.0 <= last["conflict_rate"] <= 1.0
    assert (root / "plots" / "conflicts.png").exists()


def test_local_clients_keep_training_their_own_adapter(tiny_run_config):
    """`local`: the global never moves; each client's personalized adapter is its own latest trained state,
    and its next round starts from it (so its own-split loss keeps improving over rounds)."""
    config = tiny_run_config("local", aggregation_method="local", num_rounds=3)
    result = run_simulation(config)
    root = result.output_dir
    initial = load_adapter_weights(root / "rounds" / "0" / "global")
    final_global = load_adapter_weights(result.global_dir)
    for key, tensor in initial.items():
        torch.testing.assert_close(final_global[key], tensor, rtol=0, atol=0)
    for cid, path in result.personalized_dirs.items():
        trained = RunDirectory.load_tensors(root / "rounds" / "3" / "clients" / cid / "adapter_model.safetensors")
        personalized = load_adapter_weights(path)
        for key, tensor in trained.items():
            torch.testing.assert_close(personalized[key], tensor, rtol=0, atol=1e-6)
    local = [row["local_eval_loss"] for row in result.metrics]
    assert local[3] < local[1] < local[0]  # continued training, not a restart from the initial adapter each round
    assert result.metrics[3]["global_eval_loss"] == pytest.approx(result.metrics[0]["global_eval_loss"])
    assert all(row["bytes_up"] == row["bytes_down"] == 0 for row in result.metrics)  # nothing is exchanged


def test_a_field_missing_from_an_older_saved_config_counts_as_unchanged_only_at_its_default(tmp_path):
    """Runs written before a field existed stay reusable (bench) and resumable while the field keeps its default."""
    import yaml

    from hf_fcmoe.config import load_config
    from hf_fcmoe.federation.server_state import config_changes
    from tests.conftest import TINY_RUN

    config = load_config(overrides={**TINY_RUN, "output_dir": str(tmp_path / "run")})
    saved = config.to_yaml_dict()
    del saved["retention_lambda"]  # as if written by a version without the field
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_changes(tmp_path / "config.yaml", config) == []
    changed = load_config(overrides={**TINY_RUN, "output_dir": str(tmp_path / "run"), "retention_lambda": 0.9})
    assert config_changes(tmp_path / "config.yaml", changed) == ["retention_lambda"]
    saved["learning_rate"] = 1.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert "learning_rate" in config_changes(tmp_path / "config.yaml", config)


def test_an_integer_for_a_float_field_reaches_trl_as_a_float(finished_run, tmp_path):
    """`router_aux_loss_coef: 0` (or `--router_aux_loss_coef 0`) is read as 0.0, the way `HfArgumentParser` reads a
    command line; as an int, TRL copied it into the strictly typed model config and `SFTTrainer` failed."""
    from hf_fcmoe.config import load_config
    from tests.conftest import TINY_RUN

    _, result = finished_run
    recipe = tmp_path / "r.yaml"
    recipe.write_text("router_aux_loss_coef: 0\naggregation_method: fcmoe\nretention_lambda_grid: [0, 1]\n")
    config = load_config(recipe, {**TINY_RUN, "learning_rate": 1, "output_dir": str(tmp_path / "run")})
    assert (config.router_aux_loss_coef, config.learning_rate, config.retention_lambda_grid) == (0.0, 1.0, [0.0, 1.0])
    assert isinstance(config.router_aux_loss_coef, float) and isinstance(config.learning_rate, float)
    model = load_adapter_model(result.global_dir)
    worker = ClientWorker(model, AutoTokenizer.from_pretrained(str(result.global_dir)), config)
    data = load_federated_data(config.data_spec())
    worker.prepare(data.train["client_000"], data.eval["client_000"])  # builds the SFTTrainer
    assert model.config.router_aux_loss_coef == 0.0
