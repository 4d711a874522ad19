"""A SuperNode's own side: its settings (`--node-config`), its data, and the state it keeps on its disk.

What stays on the node stays on the node: the retention residual and the personalized adapter live in
`state-dir` (Flower's `Context.state` is in memory and dies with the SuperNode), never on the server.
Residuals are kept per round, so a server that resumes an interrupted round gets the same start state.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from hf_fcmoe.aggregation.types import State
from hf_fcmoe.config import FederatedMoEConfig
from hf_fcmoe.data.federated import resolve_text_column
from hf_fcmoe.data.formatting import DEFAULT_TEMPLATE, to_training_format
from hf_fcmoe.data.sources import load_source
from hf_fcmoe.federation.run_dir import RunDirectory, save_adapter_folder

NODE_CONFIG_KEYS = {
    "client-id": "this client's name in the federation (run directory, diagnostics); required",
    "train-data": "this node's training rows: a local .json/.jsonl/.csv/.parquet file or saved dataset; required",
    "eval-data": "its eval rows (same formats); default: hold out the recipe's eval_fraction of train-data",
    "state-dir": "folder on this node for its residual and personalized adapter; required",
    "model-path": "local copy of the base model; default: the recipe's model_name_or_path",
    "num-processes": "train each local round with `accelerate launch` on this many processes (default 1)",
}
_REQUIRED = ("client-id", "train-data", "state-dir")
_ROUND_FILE = re.compile(r"(residual|global)-(\d+)\.safetensors")
KEEP_RESIDUAL_ROUNDS = 2
# a node's run folder as `hf-fcmoe push` reads it (hub/plan.py: NodeRunContents)
NODE_ROUND_FILE = "round.json"  # in personalized/: the round and client of the adapter
NODE_RECIPE_FILE = "recipe.yaml"
NODE_METRICS_FILE = "metrics.jsonl"


@dataclass
class NodeSettings:
    """A SuperNode's `--node-config`, checked: unknown keys and missing required ones are errors."""

    client_id: str
    train_data: Path
    state_dir: Path
    eval_data: Path | None = None
    model_path: str | None = None
    num_processes: int = 1

    @classmethod
    def from_node_config(cls, node_config: dict) -> NodeSettings:
        unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown node-config key(s) {unknown}; known: {sorted(NODE_CONFIG_KEYS)}")
        missing = [key for key in _REQUIRED if key not in node_config]
        if missing:
            raise ValueError(f"node-config lacks {missing}; give them with --node-config \"key='value' ...\"")
        num_processes = int(node_config.get("num-processes", 1))
        if num_processes < 1:
            raise ValueError(f"node-config num-processes must be >= 1, got {num_processes}")
        eval_data = node_config.get("eval-data")
        return cls(
            client_id=str(node_config["client-id"]),
            train_data=Path(str(node_config["train-data"])),
            state_dir=Path(str(node_config["state-dir"])),
            eval_data=Path(str(eval_data)) if eval_data else None,
            model_path=str(node_config["model-path"]) if node_config.get("model-path") else None,
            num_processes=num_processes,
        )


def _load_rows(path: Path, what: str, config: FederatedMoEConfig) -> Dataset:
    if not path.exists():
        raise FileNotFoundError(f"node-config {what} {str(path)!r} does not exist")
    raw = load_source(str(path))
    text_column = resolve_text_column(raw, str(path), config.text_column)
    return to_training_format(
        raw,
        config.task,
        text_column,
        config.label_column,
        config.class_names,
        config.prompt_template or DEFAULT_TEMPLATE,
    )


def load_node_data(settings: NodeSettings, config: FederatedMoEConfig) -> tuple[Dataset, Dataset]:
    """(train, eval) rows of this node in the recipe's training format; errors name the file and the problem."""
    train = _load_rows(settings.train_data, "train-data", config)
    if settings.eval_data is not None:
        return train, _load_rows(settings.eval_data, "eval-data", config)
    order = np.random.default_rng(config.seed).permutation(len(train))
    num_eval = max(1, int(round(len(train) * config.eval_fraction)))
    if num_eval >= len(train):
        raise ValueError(
            f"train-data {str(settings.train_data)!r} has {len(train)} rows: too few to hold out eval rows"
        )
    return train.select(sorted(order[num_eval:].tolist())), train.select(sorted(order[:num_eval].tolist()))


class NodeStore:
    """The node's `state-dir`: residuals per round and the latest personalized adapter (a PEFT folder)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def personalized_dir(self) -> Path:
        return self.root / "personalized"

    def _rounds(self, kind: str) -> list[int]:
        if not self.root.exists():
            return []
        found = (_ROUND_FILE.fullmatch(p.name) for p in self.root.iterdir())
        return sorted(int(match.group(2)) for match in found if match and match.group(1) == kind)

    def _save(self, kind: str, round_index: int, state: State) -> None:
        """Keep `state` of `round_index` (atomically) and drop those older than the last few rounds."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{kind}-{round_index}.safetensors"
        tmp = final.with_suffix(".tmp")
        RunDirectory.save_tensors(tmp, state)
        tmp.replace(final)
        for old in self._rounds(kind)[:-KEEP_RESIDUAL_ROUNDS]:
            (self.root / f"{kind}-{old}.safetensors").unlink()

    def residual_before(self, round_index: int) -> State | None:
        """The residual the node holds from the latest round before `round_index` (None before its first)."""
        rounds = [r for r in self._rounds("residual") if r < round_index]
        if not rounds:
            return None
        return RunDirectory.load_tensors(self.root / f"residual-{rounds[-1]}.safetensors")

    def save_residual(self, round_index: int, residual: State) -> None:
        self._save("residual", round_index, residual)

    def save_global(self, round_index: int, state: State) -> None:
        """The global adapter of a round, as the evaluate message brought it (the next train message omits it)."""
        self._save("global", round_index, state)

    def global_of(self, round_index: int) -> State | None:
        path = self.root / f"global-{round_index}.safetensors"
        return RunDirectory.load_tensors(path) if path.exists() else None

    @property
    def lambdas_file(self) -> Path:
        return self.root / "retention_lambdas.json"

    def _lambdas(self) -> dict[int, float]:
        if not self.lambdas_file.exists():
            return {}
        return {int(key): float(value) for key, value in json.loads(self.lambdas_file.read_text()).items()}

    def save_lambda(self, round_index: int, value: float) -> None:
        """The retention lambda this node chose at a round's evaluate (retention_lambda_grid), kept per round."""
        self.root.mkdir(parents=True, exist_ok=True)
        lambdas = {**self._lambdas(), round_index: value}
        tmp = self.lambdas_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(key): lambdas[key] for key in sorted(lambdas)}))
        tmp.replace(self.lambdas_file)

    def lambda_before(self, round_index: int) -> float | None:
        """The lambda chosen at the latest evaluate before `round_index` (the one its residual is used with)."""
        earlier = [key for key in self._lambdas() if key < round_index]
        return self._lambdas()[max(earlier)] if earlier else None

    def save_personalized(self, state: State, lora_config, tokenizer, round_index: int, client_id: str = "") -> None:
        save_adapter_folder(self.personalized_dir, state, lora_config, tokenizer)
        (self.personalized_dir / NODE_ROUND_FILE).write_text(
            json.dumps({"round": round_index, "client_id": client_id})
        )

    def record_round(self, round_index: int, recipe_yaml: str, client_id: str, global_loss: float, local_loss: float):
        """What `hf-fcmoe push` on this node needs for the personalized adapter's card: the run's recipe (as the
        server sent it) and this node's own eval losses per round, in the run directory's field names."""
        (self.root / NODE_RECIPE_FILE).write_text(recipe_yaml)
        path = self.root / NODE_METRICS_FILE
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        rows = [row for row in rows if row["round"] != round_index]  # a resumed round replaces its row
        rows.append(
            {
                "round": round_index,
                "global_eval_loss_per_client": {client_id: global_loss},
                "local_eval_loss_per_client": {client_id: local_loss},
            }
        )
        rows.sort(key=lambda row: row["round"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(path)
