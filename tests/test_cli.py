"""`hf-fcmoe` command line: the README's demo path and its errors."""

from __future__ import annotations

from hf_fcmoe.cli import main, parse_overrides


def test_overrides_are_read_as_yaml_values():
    assert parse_overrides(["--num_rounds", "2", "--lora_targets=[experts, router]", "--learning_rate", "1e-3"]) == {
        "num_rounds": 2,
        "lora_targets": ["experts", "router"],
        "learning_rate": 1e-3,
    }


def test_simulate_prints_where_adapters_are(tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = main(
        [
            "simulate",
            "--config",
            "recipes/tiny/fedavg.yaml",
            "--output_dir",
            str(out),
            "--num_rounds",
            "1",
            "--max_steps",
            "2",
            "--num_examples",
            "256",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"global adapter:        {out / 'global'}" in printed
    assert "personalized adapters:" in printed and (out / "personalized" / "client_000").exists()
    assert f"share it on the Hub:   hf-fcmoe push {out} --repo_id YOUR_NAME/cli-run" in printed  # the next command


def test_unknown_key_is_a_clear_error(capsys):
    code = main(["simulate", "--config", "recipes/tiny/fedavg.yaml", "--num_round", "2"])
    assert code == 2
    assert "unknown key --num_round in the command line; did you mean --num_rounds?" in capsys.readouterr().err


def test_partition_prints_counts_and_saves_plot(tmp_path, capsys):
    code = main(["partition", "--config", "recipes/tiny/fedavg.yaml", "--output_dir", str(tmp_path / "p")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "client_000" in printed and "addition" in printed
    assert (tmp_path / "p" / "partition.png").exists()
