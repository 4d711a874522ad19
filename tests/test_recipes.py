"""Recipes cannot drift from the code: every key is a real field, every big model builds on meta with its LoRA.

The big-model numbers (adapter bytes, trainable parameters, memory per client) come from
`python -m hf_fcmoe.models.recipe_report`; recipes/README.md must hold exactly that table.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from hf_fcmoe.config import load_config
from hf_fcmoe.models.preflight import check_launch, check_run
from hf_fcmoe.models.recipe_report import big_model_folders, recipe_numbers, report_table

ROOT = Path(__file__).resolve().parents[1]
RUN_RECIPES = sorted(
    path
    for path in (ROOT / "recipes").glob("*/*.yaml")
    if path.parent.name not in ("accelerate_configs", "bench", "flower")
)
BIG = ("mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b", "gpt-oss-20b", "deepseek-v2-lite")


@pytest.mark.parametrize("path", RUN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_run_recipe_parses_with_unknown_keys_as_errors(path):
    config = load_config(path)
    assert config.aggregation_method in ("fcmoe", "fedavg")
    assert "experts" in config.lora_targets


def test_an_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((ROOT / "recipes" / "tiny" / "fcmoe.yaml").read_text() + "lora_rank: 8\n")
    with pytest.raises(ValueError, match=r"unknown key lora_rank in recipe .*bad.yaml; did you mean lora_r\?"):
        load_config(recipe)


def test_big_model_folders_hold_config_and_both_variants():
    assert {folder.name for folder in big_model_folders()} == set(BIG)
    for folder in big_model_folders():
        fcmoe = yaml.safe_load((folder / "fcmoe.yaml").read_text())
        fedavg = yaml.safe_load((folder / "fedavg.yaml").read_text())
        source = json.loads((folder / "config.json").read_text())["_source"]
        assert source.startswith(fcmoe["model_name_or_path"] + " ")
        differing = {key for key in fcmoe.keys() | fedavg.keys() if fcmoe.get(key) != fedavg.get(key)}
        assert differing <= {"output_dir", "aggregation_method", "retention_lambda", "aggregation_options"}
        text = (folder / "fcmoe.yaml").read_text()
        assert "4-bit" in text and "accelerate launch --config_file recipes/accelerate_configs/" in text


@pytest.fixture(scope="module")
def numbers():
    return {folder.name: recipe_numbers(folder) for folder in big_model_folders()}


def test_big_models_build_on_meta_with_their_lora(numbers):
    published = {  # total parameters of the published checkpoints, in billions
        "mixtral-8x7b": 46.7,
        "qwen1.5-moe-a2.7b": 14.3,
        "qwen3-30b-a3b": 30.5,
        "olmoe-1b-7b": 6.9,
        "gpt-oss-20b": 20.9,
        "deepseek-v2-lite": 15.7,
    }
    for name, n in numbers.items():
        print(f"{name}: {n.trainable:,} trainable LoRA parameters, adapter {n.adapter_bytes:,} bytes (fp32)")
        assert abs(n.parameters / 1e9 - published[name]) < 0.05, (name, n.parameters)
        assert n.adapter_bytes == 4 * n.trainable  # every trainable tensor is a LoRA factor, saved in fp32
        assert n.expert_fraction > 0.8  # MoE weights are mostly experts: why 4-bit of nn.Linear alone buys little


def test_recipes_readme_holds_the_report_table(numbers):
    readme = (ROOT / "recipes" / "README.md").read_text()
    assert report_table(list(numbers.values())) in readme, "regenerate with: python -m hf_fcmoe.models.recipe_report"


def test_launches_that_cannot_serve_a_run_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="num_processes=1 shards nothing"):
        check_launch(world_size=1, cuda=True)
    with pytest.raises(ValueError, match="needs GPUs and none is visible"):
        check_launch(world_size=8, cuda=False)
    check_launch(world_size=8, cuda=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if importlib.util.find_spec("deepspeed") is None:  # not a dependency: the launch says how to get it
        with pytest.raises(ValueError, match="pip install deepspeed"):
            check_launch(world_size=8, cuda=True)
    else:
        check_launch(world_size=8, cuda=True)


def test_bad_model_and_targets_fail_before_any_weights(tmp_path):
    from transformers import LlamaConfig

    dense = tmp_path / "dense"
    LlamaConfig(num_hidden_layers=1, hidden_size=32).save_pretrained(dense)  # a config and no weights at all
    with pytest.raises(ValueError, match="'llama' is not a supported Mixture-of-Experts"):
        check_run(load_config(overrides={"model_name_or_path": str(dense), "output_dir": str(tmp_path / "o")}))
    mixtral = tmp_path / "mixtral"
    config = json.loads((ROOT / "recipes" / "mixtral-8x7b" / "config.json").read_text())
    mixtral.mkdir()
    (mixtral / "config.json").write_text(json.dumps(config))  # 47B of config, no weights
    bad_targets = {"model_name_or_path": str(mixtral), "lora_targets": ["experts", "shared_experts"]}
    with pytest.raises(ValueError, match="'shared_experts' does not exist in model_type 'mixtral'"):
        check_run(load_config(overrides={**bad_targets, "output_dir": str(tmp_path / "o")}))
    with pytest.raises(FileNotFoundError, match="has a config.json but no weights"):
        check_run(load_config(overrides={"model_name_or_path": str(mixtral), "output_dir": str(tmp_path / "o")}))


def test_gpu_check_skips_on_cpu_and_its_round_runs_at_test_sizes(capsys):
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_client_round

    if not torch.cuda.is_available():
        assert gpu_client_round.main([]) == 0
        assert "gpu_check skipped: no CUDA GPU visible" in capsys.readouterr().out
    row = gpu_client_round.run_model("qwen3-30b-a3b", layers=1, steps=2, batch=2, seq=16, device="cpu", tiny=True)
    assert row["tokens_per_s"] > 0 and row["train_loss"] > 0
