"""The ClientApp: a SuperNode trains and evaluates on its own data, and keeps its residual on its own disk.

Flower starts a fresh `flwr-clientapp` process per message, so every handler builds its `NodeSession`
(node settings, the recipe the server sent, the node's data, the base model + LoRA) and checks the
fingerprint before any work. Anything wrong on the node is answered with a `rejected` record that names
the client and the reason, so the server can go on with the others.

Messages (the server's `FlowerFederation` sends them):
- query: "who are you?": client id and fingerprint (the node's settings and data are checked too);
- train: the global adapter (omitted when the node holds it from the last evaluate message); the node adds
  lambda * its residual, trains, and replies with its update: only the tensors and expert slices that differ
  from that global (an expert that routed no token comes back unchanged and is not sent);
- evaluate: the new global adapter and, for clients of the round, their new residual (stored on the node,
  never on the server); the node scores the global and its personalized adapter on its eval rows and
  writes the personalized adapter to `state-dir/personalized`. With `retention_lambda_grid` the node first
  chooses its lambda on rows held out of its own train split (`federation/lambda_choice.py`), keeps it for
  its next train message and reports it (and the validation losses) as evaluate metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hf_fcmoe.adapters.layout import ExpertLayout
from hf_fcmoe.adapters.lora import (
    apply_expert_lora,
    build_lora_config,
    expert_layout_from_configs,
    expert_layout_from_peft_model,
)
from hf_fcmoe.aggregation.types import ClientUpdate, State
from hf_fcmoe.config import FederatedMoEConfig, load_config
from hf_fcmoe.federation.client import ClientWorker
from hf_fcmoe.federation.flower.codec import fingerprint, get_state, update_to_content
from hf_fcmoe.federation.flower.node import NodeSettings, NodeStore, load_node_data
from hf_fcmoe.federation.lambda_choice import choose_on_validation, hold_out_validation
from hf_fcmoe.federation.retention import add_scaled, scaled
from hf_fcmoe.federation.round_metrics import score_state
from hf_fcmoe.federation.run_dir import RunDirectory
from hf_fcmoe.federation.safeguards import finish_update
from hf_fcmoe.models.families import get_family
from hf_fcmoe.models.loading import is_tiny, load_base_model, save_base_model

app = ClientApp()


def recipe_config(recipe_yaml: str, settings: NodeSettings) -> FederatedMoEConfig:
    """The server's resolved recipe, as this node runs it (scratch output under the node's state-dir)."""
    import yaml

    values = yaml.safe_load(recipe_yaml)
    values["output_dir"] = str(settings.state_dir / "scratch")
    if settings.num_processes > 1 and not torch.cuda.is_available():
        values["use_cpu"] = True  # gloo DDP on CPU processes
    return load_config(overrides=values)


class NodeSession:
    """Everything one message's work needs on this node, built and checked in one place."""

    def __init__(
        self,
        settings: NodeSettings,
        recipe_yaml: str,
        expected_fingerprint: str,
        with_model: bool = True,
        run_key: str = "",
    ):
        self.settings = settings
        self.config = recipe_config(recipe_yaml, settings)
        # one folder per federation run (a resumed run keeps its key), so runs never mix residuals
        self.store = NodeStore(settings.state_dir / "runs" / run_key if run_key else settings.state_dir)
        self.train_rows, self.eval_rows = load_node_data(self.settings, self.config)
        # retention_lambda_grid: the rows that choose this node's lambda, held out of its training rows
        self.train_rows, self.validation_rows = hold_out_validation(self.config, self.train_rows, settings.client_id)
        source = self.settings.model_path or self.config.model_name_or_path
        model, self.tokenizer = load_base_model(
            source, seed=self.config.seed, num_experts=self.config.tiny_num_experts
        )
        reference = source
        if is_tiny(source):  # adapters saved on the node must load alone: keep the built base next to them
            base_dir = self.settings.state_dir / "base_model"
            reference = (
                str(base_dir.resolve()) if base_dir.exists() else save_base_model(model, self.tokenizer, base_dir)
            )
        config = self.config
        self.lora_config = build_lora_config(
            get_family(model.config), config.lora_r, config.lora_alpha, config.lora_targets, reference
        )
        self.model_config = model.config
        self.fingerprint = fingerprint(model.config, self.lora_config)
        expected = expected_fingerprint
        if self.fingerprint != expected:
            raise ValueError(
                f"base model or LoRA config differs from the server's (fingerprint {self.fingerprint} != {expected}): "
                "use the recipe's model (or an identical local copy as model-path) and its lora_* fields"
            )
        self.worker = None
        if with_model:
            torch.manual_seed(config.seed)
            self.worker = ClientWorker(apply_expert_lora(model, self.lora_config), self.tokenizer, config)
            self.splits = self.worker.prepare(self.train_rows, self.eval_rows, self.validation_rows)

    @classmethod
    def from_message(cls, message: Message, context: Context, with_model: bool | None = True) -> NodeSession:
        """`with_model=None`: load the model here only when this process trains (num-processes 1)."""
        settings = NodeSettings.from_node_config(dict(context.node_config))
        instruction = message.content["instruction"]
        if with_model is None:
            with_model = settings.num_processes == 1
        recipe, expected, run_key = (str(instruction[key]) for key in ("recipe", "fingerprint", "run_key"))
        session = cls(settings, recipe, expected, with_model, run_key)
        session.instruction = instruction
        return session

    @property
    def layout(self) -> ExpertLayout:
        """Which tensors are fused expert factors (to send only the experts that changed)."""
        if self.worker is not None:
            return expert_layout_from_peft_model(self.worker.model)
        return expert_layout_from_configs(self.model_config, self.lora_config)

    @property
    def client_id(self) -> str:
        return self.settings.client_id

    def client_record(self) -> ConfigRecord:
        return ConfigRecord({"client_id": self.client_id, "fingerprint": self.fingerprint})


def _rejected(message: Message, context: Context, error: Exception) -> Message:
    client_id = str(dict(context.node_config).get("client-id", f"node {context.node_id}"))
    reason = str(error) or type(error).__name__
    content = RecordDict({"rejected": ConfigRecord({"client_id": client_id, "reason": reason})})
    return Message(content=content, reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Introduce this node: client id, fingerprint and data size (a bad node-config or data fails here)."""
    try:
        session = NodeSession.from_message(message, context, with_model=False)
    except Exception as error:  # noqa: BLE001 - any failure on the node is reported, not raised
        return _rejected(message, context, error)
    content = RecordDict(
        {
            "client": session.client_record(),
            "data": MetricRecord(
                {
                    "train_rows": len(session.train_rows),
                    "eval_rows": len(session.eval_rows),
                    "num_processes": session.settings.num_processes,
                }
            ),
        }
    )
    return Message(content=content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One local round from global + lambda * residual; the reply is the update (trained - lambda * residual)."""
    try:
        session = NodeSession.from_message(message, context, with_model=None)
        instruction = session.instruction
        round_index = int(instruction["round"])
        global_state = get_state(message.content, "global")
        if global_state is None:  # not sent: this node holds it from the last evaluate message
            cached = int(instruction["global_round"])
            global_state = session.store.global_of(cached)
            if global_state is None:
                raise ValueError(f"the server sent no global adapter and this node holds none of round {cached}")
        residual = session.store.residual_before(round_index)
        scale, retention = float(instruction["personal_scale"]), float(instruction["retention"])
        chosen = session.store.lambda_before(round_index)  # retention_lambda_grid: this node's own lambda
        if chosen is not None:
            scale = retention = chosen
        start = add_scaled(global_state, residual, scale)
        retained = scaled(residual, retention)
        seed = int(instruction["seed"])
        if session.settings.num_processes > 1:
            update = train_with_accelerate(session, start, retained, seed, str(instruction["recipe"]))
        else:
            update = session.worker.train(session.client_id, session.splits, start, seed=seed, retained=retained)
        # as the in-process engine: client-side DP when the recipe asks, and the round's fingerprint for the hub
        configs = (session.model_config.to_dict(), session.lora_config.to_dict())
        update = finish_update(update, global_state, session.config, *configs, round_index, seed)
        # only what differs from the global the round started from travels (the server holds that global)
        content = update_to_content(update, session.fingerprint, start=global_state, layout=session.layout)
    except Exception as error:  # noqa: BLE001
        return _rejected(message, context, error)
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Store the round's residual (if sent), write the personalized adapter, score global and personalized."""
    try:
        session = NodeSession.from_message(message, context)
        instruction = session.instruction
        round_index = int(instruction["round"])
        global_state = get_state(message.content, "global")
        session.store.save_global(round_index, global_state)
        zeros = {key: torch.zeros_like(tensor) for key, tensor in global_state.items()}
        residual = get_state(message.content, "residual", zeros)  # sent sparse: slices without a conflict are 0
        if residual is not None:
            session.store.save_residual(round_index, residual)
        residual = session.store.residual_before(round_index + 1)
        scale, choice = float(instruction["personal_scale"]), None
        grid = session.config.retention_lambda_grid
        if grid is not None and residual is not None:  # chosen here, on rows that never leave the node
            choice = choose_on_validation(session.worker, session.splits.validation, global_state, residual, grid)
            session.store.save_lambda(round_index, choice.value)
            scale = choice.value
        personalized = add_scaled(global_state, residual, scale)
        session.store.save_personalized(
            personalized, session.lora_config, session.tokenizer, round_index, session.client_id
        )
        raw_eval = {session.client_id: session.eval_rows} if session.config.task == "classification" else None
        splits = {session.client_id: session.splits}
        global_score = score_state(session.worker, splits, global_state, [session.client_id], raw_eval)
        if residual is None:
            local_score = global_score
        else:
            local_score = score_state(session.worker, splits, personalized, [session.client_id], raw_eval)
        own = (global_score[session.client_id].loss, local_score[session.client_id].loss)
        session.store.record_round(round_index, str(instruction["recipe"]), session.client_id, *own)
    except Exception as error:  # noqa: BLE001
        return _rejected(message, context, error)
    scores = {"eval_rows": len(session.eval_rows), **(choice.metrics() if choice is not None else {})}
    for prefix, score in (("global", global_score[session.client_id]), ("local", local_score[session.client_id])):
        scores.update({f"{prefix}_nll_sum": score.nll_sum, f"{prefix}_tokens": score.tokens})
        if score.accuracy is not None:
            scores[f"{prefix}_accuracy"] = score.accuracy
    content = RecordDict({"client": session.client_record(), "scores": MetricRecord(scores)})
    return Message(content=content, reply_to=message)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_with_accelerate(
    session: NodeSession, start: State, retained: State | None, seed: int, recipe_yaml: str
) -> ClientUpdate:
    """A local round on several processes: `accelerate launch` on this node, adapters exchanged as files."""
    with tempfile.TemporaryDirectory(prefix="local_round_", dir=session.settings.state_dir) as tmp:
        job = Path(tmp)
        RunDirectory.save_tensors(job / "start.safetensors", start)
        if retained is not None:
            RunDirectory.save_tensors(job / "retained.safetensors", retained)
        settings = session.settings
        node_config = {
            "client-id": settings.client_id,
            "train-data": str(settings.train_data),
            "state-dir": str(settings.state_dir),
            **({"eval-data": str(settings.eval_data)} if settings.eval_data else {}),
            **({"model-path": settings.model_path} if settings.model_path else {}),
            "num-processes": settings.num_processes,
        }
        spec = {"recipe": recipe_yaml, "node_config": node_config, "seed": seed, "fingerprint": session.fingerprint}
        (job / "job.json").write_text(json.dumps(spec))
        # MULTI_GPU + use_cpu is what runs N gloo processes on a CPU-only node (`--cpu` alone runs one)
        launch = {
            "compute_environment": "LOCAL_MACHINE",
            "distributed_type": "MULTI_GPU",
            "num_machines": 1,
            "num_processes": settings.num_processes,
            "use_cpu": not torch.cuda.is_available(),
            "mixed_precision": "no",
            "main_process_port": _free_port(),
        }
        (job / "accelerate.yaml").write_text(json.dumps(launch))  # JSON is YAML
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(job / "accelerate.yaml")]
        command += ["-m", "hf_fcmoe.federation.flower.local_round", str(job)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"accelerate launch of the local round failed ({done.returncode}): {tail[0]}")
        stats = json.loads((job / "stats.json").read_text())
        return ClientUpdate(
            client_id=settings.client_id,
            state=RunDirectory.load_tensors(job / "update.safetensors"),
            num_examples=int(stats["num_examples"]),
            expert_counts=torch.tensor(stats["expert_counts"], dtype=torch.int64),
            train_loss=stats["train_loss"],
            metrics=stats.get("metrics", {}),
        )
