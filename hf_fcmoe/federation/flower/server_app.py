"""The ServerApp: the round loop of a Flower federation, with the run directory and resume.

The loop: find the SuperNodes (a query names each node's client and checks its fingerprint), then per round
train (strategy -> hub), evaluate on the nodes, checkpoint the round and append its metrics row through
`federation.server_state`, exactly as the in-process engine writes them. Flower itself has no server-side
resume: `resume = true` in the run config continues from the last completed round of `output_dir`.

Evaluation: the server holds no data, so every number comes from the nodes: each live node scores the new
global adapter and its own personalized adapter (global + lambda * its residual, which only the node has)
on its eval rows and replies with (nll sum, token count); the server combines them token-weighted into the
same fields as the simulation (`global_eval_loss`, `local_eval_loss`, per client).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from functools import partial
from logging import INFO, WARNING
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from hf_fcmoe.aggregation import AggregationResult
from hf_fcmoe.config import FederatedMoEConfig, load_config
from hf_fcmoe.federation import server_state
from hf_fcmoe.federation.flower.codec import fingerprint, state_to_records
from hf_fcmoe.federation.flower.initial_adapter import draw_initial_adapter, load_initial_adapter
from hf_fcmoe.federation.flower.strategy import FCMoEStrategy, reply_problem
from hf_fcmoe.federation.retention import hub_retention
from hf_fcmoe.federation.run_dir import RunDirectory
from hf_fcmoe.federation.safeguards import dp_metrics, enroll_clients

RUN_CONFIG_KEYS = {
    "recipe": "recipe YAML (FederatedMoEConfig fields), relative to the app folder or absolute; required",
    "output-dir": "overrides the recipe's output_dir (the run directory on the server)",
    "resume": "continue the run in output_dir from its last completed round (default false)",
    "round-timeout": "seconds to wait for a round's replies (default 3600)",
    "wait-timeout": "seconds to wait for min-nodes SuperNodes to join (default 600)",
    "min-nodes": "SuperNodes needed to start (default or 0: the recipe's num_clients)",
    "initial-adapter": "PEFT folder of the first global (`python -m hf_fcmoe.federation.flower.initial_adapter`); "
    "the server then loads no base weights",
}
FEDERATION_FILE = "federation.json"  # the fixed client list and the run key nodes file their state under


def server_config(run_config: dict, app_dir: Path | None) -> tuple[FederatedMoEConfig, dict]:
    """The recipe named by the run config (with output-dir applied) and the run config's own options."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; known: {sorted(RUN_CONFIG_KEYS)}")
    if not run_config.get("recipe"):
        raise ValueError("run-config needs recipe='<path to a recipe YAML>'")
    recipe = Path(str(run_config["recipe"]))
    if not recipe.is_absolute() and app_dir is not None and (app_dir / recipe).exists():
        recipe = app_dir / recipe
    if not recipe.exists():
        raise FileNotFoundError(f"recipe {str(recipe)!r} does not exist")
    overrides = {"output_dir": str(run_config["output-dir"])} if run_config.get("output-dir") else {}
    config = load_config(recipe, overrides)
    options = {
        "resume": bool(run_config.get("resume", False)),
        "round_timeout": float(run_config.get("round-timeout", 3600)),
        "wait_timeout": float(run_config.get("wait-timeout", 600)),
        "min_nodes": int(run_config.get("min-nodes") or config.num_clients),
        "initial_adapter": Path(str(run_config["initial-adapter"])) if run_config.get("initial-adapter") else None,
    }
    return config, options


class FlowerFederation:
    """One ServerApp run: setup (as the in-process engine: same initial adapter), node directory, round loop."""

    def __init__(
        self,
        config: FederatedMoEConfig,
        resume=False,
        round_timeout=3600.0,
        wait_timeout=600.0,
        min_nodes=None,
        initial_adapter: Path | None = None,
    ):
        server_state.require_engine(config, "flower")
        self.config = config
        self.resume = resume
        self.round_timeout = round_timeout
        self.wait_timeout = wait_timeout
        self.min_nodes = config.num_clients if min_nodes is None else min_nodes
        self.run_dir = RunDirectory(config.output_dir)
        server_state.check_output_dir(config, resume)
        if initial_adapter is not None:  # no base weights on the server: configs and the saved first global
            setup = load_initial_adapter(config, initial_adapter)
        else:  # the first global drawn exactly as the in-process engine draws it (the model is dropped after)
            setup = draw_initial_adapter(config, self.run_dir.base_model_dir)
        self.tokenizer, self.lora_config, self.layout = setup.tokenizer, setup.lora_config, setup.layout
        self.initial_state = setup.initial_state
        self.fingerprint = fingerprint(setup.model_config, self.lora_config)
        self.hub = server_state.build_hub(config, self.layout)
        # every update must come from this base + adapter config and round (checked by the hub, as in-process)
        self.hub.announce(setup.model_config.to_dict(), self.lora_config.to_dict())
        self.keeps_own_state = config.aggregation_method == "local"
        self.refused: dict[int, str] = {}
        self.join_rejected: dict[str, str] = {}

    # ------------------------------------------------------------------ nodes
    def _strategy(self, client_ids: list[str], run_key: str) -> FCMoEStrategy:
        recipe = yaml.safe_dump(self.config.to_yaml_dict(), sort_keys=True)
        return FCMoEStrategy(
            self.hub,
            client_ids,
            self.config.sampled_per_round,
            self.config.seed,
            instruction={"recipe": recipe, "fingerprint": self.fingerprint, "run_key": run_key},
            personal_scale=1.0 if self.keeps_own_state else hub_retention(self.hub),
            keeps_own_state=self.keeps_own_state,
        )

    def refresh_nodes(self, grid: Grid, strategy: FCMoEStrategy, allowed: set[str] | None, wait: bool = False) -> None:
        """Forget dead nodes, introduce new ones (query: client id + fingerprint); `wait` for min-nodes."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            live = set(grid.get_node_ids())
            strategy.nodes = {cid: node for cid, node in strategy.nodes.items() if node in live}
            new = sorted(live - set(strategy.nodes.values()) - set(self.refused))
            if new:
                messages = strategy.hello_messages(new)
                replies = grid.send_and_receive(messages, timeout=self.round_timeout)
                by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
                for reply in replies:
                    self._admit(strategy, by_id[reply.metadata.reply_to_message_id], reply, allowed)
            if not wait or len(strategy.nodes) >= self.min_nodes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(strategy.nodes)} of {self.min_nodes} SuperNodes joined within {self.wait_timeout:g} s "
                    f"(joined: {sorted(strategy.nodes)}; refused: {self.refused}); start more or lower min-nodes"
                )
            time.sleep(1.0)

    def _admit(self, strategy: FCMoEStrategy, node: int, reply: Message, allowed: set[str] | None) -> None:
        problem = reply_problem(reply)
        cid = None
        if problem is None:
            client = reply.content["client"]
            cid = str(client["client_id"])
            if str(client["fingerprint"]) != self.fingerprint:
                problem = (
                    f"base model or LoRA config differs (fingerprint {client['fingerprint']} != {self.fingerprint})"
                )
            elif allowed is not None and cid not in allowed:
                problem = f"client {cid!r} is not one of this run's clients {sorted(allowed)}"
            elif cid in strategy.nodes:  # a restarted node whose old id is not declared dead yet: ask again later
                log(INFO, "client %r on node %s waits: node %s still holds it", cid, node, strategy.nodes[cid])
                return
            else:
                problem = self._enroll(cid, reply.content)
        if problem is not None:
            if cid is None and reply.has_error() is False and "rejected" in reply.content:
                cid = str(reply.content["rejected"]["client_id"])
            name = cid or f"node {node}"
            self.refused[node] = problem
            self.join_rejected[name] = f"client {name!r} (node {node}): {problem}"
            log(WARNING, "refused %s", self.join_rejected[name])
            return
        strategy.nodes[cid] = node
        strategy.holds_global.pop(cid, None)  # a new node: send it the global in full
        log(INFO, "client %r joined on node %s", cid, node)

    def _enroll(self, cid: str, content) -> str | None:
        """Tell the hub the node's declared size and routed-token bound (what the in-process engine enrolls)."""
        try:
            data = content["data"]
            rows, processes = int(data["train_rows"]), int(data.get("num_processes", 1))
            enroll_clients(self.hub, self.config, {cid: rows}, self.layout.top_k, processes)
        except (KeyError, TypeError, ValueError) as error:
            return f"cannot be enrolled ({error})"
        return None

    # ------------------------------------------------------------------ the loop
    def _federation_file(self) -> Path:
        return self.run_dir.root / FEDERATION_FILE

    def run(self, grid: Grid) -> list[dict]:
        if self.resume:
            federation = json.loads(self._federation_file().read_text())
            last = server_state.last_completed_round(self.run_dir)
            self.run_dir.roll_back_to(last)
            global_state, _ = server_state.load_round(self.run_dir, last, self.hub)  # residuals live on the nodes
            strategy = self._strategy(federation["client_ids"], federation["run_key"])
            self.refresh_nodes(grid, strategy, set(federation["client_ids"]), wait=True)
        else:
            server_state.write_fresh_run(self.run_dir, self.config)
            last, global_state = 0, self.initial_state
            strategy = self._strategy([], uuid.uuid4().hex[:12])
            self.refresh_nodes(grid, strategy, None, wait=True)
            strategy.client_ids = sorted(strategy.nodes)
            federation = {"client_ids": strategy.client_ids, "run_key": strategy.instruction["run_key"]}
            self._federation_file().write_text(json.dumps(federation, indent=2))
        if self.config.sampled_per_round > len(strategy.client_ids):
            raise ValueError(
                f"clients_per_round={self.config.sampled_per_round} exceeds the {len(strategy.client_ids)} clients"
            )
        strategy.global_state, strategy.global_round = global_state, last
        if last == 0 and not self.resume:
            self._evaluate(grid, strategy, 0)
            row = server_state.metrics_row(
                self._eval_fields(strategy),
                0,
                self.config.aggregation_method,
                global_state,
                AggregationResult(global_state),
                [],
                0.0,
            )
            self._record(row, strategy, bytes_up=0, bytes_down=strategy.eval_bytes_down)
            server_state.write_round(
                self.run_dir, 0, global_state, self.lora_config, [], {}, self.hub, row, self.config.num_rounds
            )
        for round_index in range(last + 1, self.config.num_rounds + 1):
            started = time.perf_counter()
            self.refresh_nodes(grid, strategy, set(strategy.client_ids))
            arrays = state_to_records(strategy.global_state)[0]
            messages = strategy.configure_train(round_index, arrays, ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=self.round_timeout) if messages else []
            strategy.aggregate_train(round_index, replies)
            outcome = strategy.outcome
            self._evaluate(grid, strategy, round_index)
            row = server_state.metrics_row(
                self._eval_fields(strategy),
                round_index,
                self.config.aggregation_method,
                strategy.global_state,
                outcome.result,
                outcome.updates,
                time.perf_counter() - started,
            )
            self._record(row, strategy, outcome.bytes_up, outcome.bytes_down + strategy.eval_bytes_down)
            row["rejected"] = {**row.get("rejected", {}), **outcome.rejected}
            if outcome.missing:
                row["missing"] = outcome.missing
                log(WARNING, "round %s: no update from %s", round_index, outcome.missing)
            server_state.write_round(
                self.run_dir,
                round_index,
                strategy.global_state,
                self.lora_config,
                outcome.updates,
                {},  # never on the server: each node keeps its own residual
                self.hub,
                row,
                self.config.num_rounds,
            )
            log(INFO, "round %s: global eval loss %.4f", round_index, row["global_eval_loss"])
        metrics = self.run_dir.read_metrics()
        server_state.write_final_outputs(
            self.run_dir, strategy.global_state, self.lora_config, self.tokenizer, metrics
        )
        return metrics

    def _evaluate(self, grid: Grid, strategy: FCMoEStrategy, round_index: int) -> None:
        arrays = state_to_records(strategy.global_state)[0]
        messages = strategy.configure_evaluate(round_index, arrays, ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=self.round_timeout) if messages else []
        strategy.aggregate_evaluate(round_index, replies)

    @staticmethod
    def _eval_fields(strategy: FCMoEStrategy) -> dict:
        if strategy.eval_fields:
            return strategy.eval_fields
        return {"global_eval_loss": math.nan, "local_eval_loss": math.nan, "local_eval_loss_per_client": {}}

    def _record(self, row: dict, strategy: FCMoEStrategy, bytes_up: int, bytes_down: int) -> None:
        """Flower-only fields: bytes as sent (ArrayRecords), who joined late or was refused, eval gaps."""
        row["bytes_up"], row["bytes_down"] = bytes_up, bytes_down
        row["engine"] = "flower"
        sampled = partial(
            server_state.sample_clients, strategy.client_ids, self.config.sampled_per_round, self.config.seed
        )
        row.update(dp_metrics(self.config, sampled, row["round"]))  # as in-process: epsilon of rounds 1..t
        if self.join_rejected:
            row["rejected"] = {**row.get("rejected", {}), **self.join_rejected}
            self.join_rejected = {}
        if strategy.eval_missing:
            row["eval_missing"] = strategy.eval_missing


def build_server_app(app_dir: Path | None = None) -> ServerApp:
    """A ServerApp whose relative `recipe` paths resolve against `app_dir` (the Flower app's folder)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config, options = server_config(dict(context.run_config), app_dir)
        FlowerFederation(config, **options).run(grid)

    return app


app = build_server_app()
