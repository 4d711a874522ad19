"""A user's mistakes in a recipe or on the command line: one line naming the value, where it came from, what to do."""

from __future__ import annotations

import dataclasses

import pytest

from hf_fcmoe.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("num_rounds: 2\nlora_targets: [experts\nnum_clients: 3\n")
    assert main(["simulate", "--config", str(recipe)]) == 2
    assert f"recipe {recipe} is not valid YAML at line" in _error_line(capsys)


def test_wrong_type_on_the_command_line_is_one_line(capsys):
    assert main(["simulate", "--config", "recipes/tiny/fedavg.yaml", "--num_rounds", "abc"]) == 2
    assert _error_line(capsys).endswith("num_rounds must be an integer, got 'abc' (command line --num_rounds)")


def test_wrong_type_in_a_recipe_says_so(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_clients: many\n")
    assert main(["simulate", "--config", str(recipe)]) == 2
    assert f"num_clients must be an integer, got 'many' (recipe {recipe})" in _error_line(capsys)


def test_unknown_recipe_key_suggests_the_closest_field(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_round: 2\n")
    assert main(["simulate", "--config", str(recipe)]) == 2
    assert f"unknown key num_round in recipe {recipe}; did you mean num_rounds?" in _error_line(capsys)


def test_unknown_bench_run_key_suggests_the_closest_field(capsys):
    assert main(["bench", "--config", "recipes/bench/offline.yaml", "--run.learning_rat", "0.1"]) == 2
    assert "unknown key --run.learning_rat in the command line; did you mean --run.learning_rate?" in _error_line(
        capsys
    )


def test_unreachable_hub_model_fails_fast_in_one_line(monkeypatch):
    from hf_fcmoe.data import sources
    from hf_fcmoe.models import loading

    monkeypatch.setattr(loading, "_offline", lambda: False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: False)
    with pytest.raises(ConnectionError, match="cannot load model 'someone/moe' from the Hub: no connection.*local"):
        loading.load_base_model("someone/moe")


def test_unreachable_upcycle_source_fails_fast(monkeypatch):
    from hf_fcmoe.data import sources
    from hf_fcmoe.models import loading
    from hf_fcmoe.models.upcycle import load_dense

    monkeypatch.setattr(loading, "_offline", lambda: False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: False)
    with pytest.raises(ConnectionError, match="cannot load model 'someone/llama' from the Hub: no connection"):
        load_dense("someone/llama")


def test_uncached_hub_model_in_offline_mode_is_one_line():
    from hf_fcmoe.models.loading import load_base_model

    with pytest.raises(ConnectionError, match="'no-such-owner/no-such-moe'.*offline mode and no cached copy"):
        load_base_model("no-such-owner/no-such-moe")


def test_missing_local_model_folder_is_named():
    from hf_fcmoe.models.loading import load_base_model

    with pytest.raises(FileNotFoundError, match="model folder './no-such-folder' does not exist"):
        load_base_model("./no-such-folder")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_simulate_help_lists_every_field_grouped_with_defaults_and_methods(capsys):
    from hf_fcmoe.aggregation.options import METHODS
    from hf_fcmoe.config import FederatedMoEConfig

    text = _help(capsys, "simulate")
    for f in dataclasses.fields(FederatedMoEConfig):
        if f.init:
            assert f"--{f.name} (default: " in text, f.name
    for group in ("model and adapter:", "data:", "federation:", "aggregation:", "local training"):
        assert f"\n{group}" in text
    assert "--num_rounds (default: 3)\n      Federated rounds." in text
    assert ", ".join(METHODS) in text


@pytest.mark.parametrize(
    ("command", "module", "name"),
    [("upcycle", "hf_fcmoe.models.upcycle", "UpcycleConfig"), ("bench", "hf_fcmoe.bench.config", "BenchConfig")],
)
def test_upcycle_and_bench_help_list_their_fields(capsys, command, module, name):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    text = _help(capsys, command)
    for f in dataclasses.fields(cls):
        if f.init:
            assert f"--{f.name} (default: " in text, f.name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--aggregation_method", "fcmo"], "unknown aggregation method 'fcmo'; available: fcmoe, fedavg"),
        (["--learning_rate", "-0.01"], "learning_rate must be > 0, got -0.01"),
        (["--aggregation_options", "{kapa: 1}"], "unknown option(s) for method 'fcmoe': ['kapa']"),
        (["--lora_targets", "[router]"], "lora_targets must include 'experts'"),
        (["--partition", "dirichlett"], "unknown partition 'dirichlett'"),
        (["--model_name_or_path", "tiny:mixtrall"], "unknown tiny model type 'mixtrall'"),
    ],
)
def test_bad_settings_fail_before_the_run_writes_anything(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["simulate", "--config", "recipes/tiny/fcmoe.yaml", "--output_dir", str(out), *override]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()  # no base_model/, config.yaml, state.json or metrics left behind
