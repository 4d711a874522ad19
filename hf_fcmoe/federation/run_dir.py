"""The run directory: the contract between engine, hub, publisher and report (DESIGN.md section 3).

Every round is written to a temporary folder and renamed into place only when complete, and
`state.json` is replaced atomically after it, so a crash never leaves a half-written round and
never overwrites a completed one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from hf_fcmoe.aggregation.types import State

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def portable_lora_config(lora_config: LoraConfig, folder: Path) -> LoraConfig:
    """`lora_config` as saved in `folder`: a local base model is named relative to the folder, never absolutely.

    A run directory must load from wherever it is copied (issue 15), so an absolute path to a local base
    (`<run>/base_model` of a tiny model) becomes e.g. ``../base_model``; `hf_fcmoe.load_adapter_model`
    resolves it against the adapter folder (PEFT itself would resolve it against the working directory).
    """
    base = lora_config.base_model_name_or_path
    if not base or not os.path.isabs(base):
        return lora_config
    portable = copy.copy(lora_config)
    portable.base_model_name_or_path = os.path.relpath(base, Path(folder).resolve()).replace(os.sep, "/")
    return portable


def save_adapter_folder(path: Path, state: State, lora_config: LoraConfig, tokenizer=None) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), loadable by from_pretrained."""
    path.mkdir(parents=True, exist_ok=True)
    portable_lora_config(lora_config, path).save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def load_adapter_weights(path: Path) -> State:
    return load_file(str(path / ADAPTER_WEIGHTS))


class RunDirectory:
    """Paths and atomic writes of one run's output folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- paths
    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    def round_dir(self, round_index: int) -> Path:
        return self.root / "rounds" / str(round_index)

    @property
    def base_model_dir(self) -> Path:
        return self.root / "base_model"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    # --- state
    def has_completed_rounds(self) -> bool:
        return self.state_file.exists()

    def read_state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def write_state(self, state: dict) -> None:
        _write_json_atomic(self.state_file, state)

    # --- rounds
    def staging_dir(self, round_index: int) -> Path:
        """A fresh temporary folder for round `round_index`; committed with `commit_round`."""
        staging = self.root / "rounds" / f".staging-{round_index}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging

    def commit_round(self, round_index: int, staging: Path) -> Path:
        final = self.round_dir(round_index)
        if final.exists():
            raise FileExistsError(f"round {round_index} already exists in {self.root}; refusing to overwrite it")
        os.rename(staging, final)
        return final

    def discard_uncommitted(self, last_round: int) -> None:
        """Remove staging folders and any round after `last_round` (left by an interrupted run)."""
        rounds = self.root / "rounds"
        if not rounds.exists():
            return
        for child in rounds.iterdir():
            if child.name.startswith(".staging-") or (child.name.isdigit() and int(child.name) > last_round):
                shutil.rmtree(child)

    def roll_back_to(self, last_round: int) -> None:
        """Forget everything an interrupted run wrote after `last_round` (round folders and metric rows)."""
        self.discard_uncommitted(last_round)
        self.truncate_metrics(last_round)

    # --- metrics
    def append_metrics(self, row: dict) -> None:
        """Add a row by replacing the file atomically (a crash never leaves half a line)."""
        old = self.metrics_file.read_text() if self.metrics_file.exists() else ""
        tmp = self.metrics_file.with_suffix(".jsonl.tmp")
        tmp.write_text(old + json.dumps(row, sort_keys=True) + "\n")
        os.replace(tmp, self.metrics_file)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only metric rows of rounds <= last_round (rows of an interrupted round are dropped)."""
        rows = [row for row in self.read_metrics() if row["round"] <= last_round]
        tmp = self.metrics_file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        os.replace(tmp, self.metrics_file)

    # --- residuals and server state
    @staticmethod
    def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    @staticmethod
    def load_tensors(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))
