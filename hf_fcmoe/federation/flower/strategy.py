"""The Flower strategy: messages out, replies in, validation. The math is the `AggregationHub`'s.

`configure_train` samples the round's clients exactly as the in-process engine does (seeded by round),
`aggregate_train` turns replies into `ClientUpdate`s, rejects what is wrong with a reason naming the client
(error replies, node-side rejections, client-id mismatches; the hub then validates the rest: enrolment, claimed
sizes, the round's config fingerprint, shapes and values),
and hands the accepted ones to `AggregationHub.aggregate`. Per-client numbers (num_examples, expert counts,
train loss) stay per client: nothing goes through Flower's metric averaging.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hf_fcmoe.aggregation import AggregationHub, AggregationResult, ClientUpdate
from hf_fcmoe.aggregation.types import State
from hf_fcmoe.federation.client import round_seed
from hf_fcmoe.federation.flower.codec import content_to_update, put_state, state_bytes, state_to_records
from hf_fcmoe.federation.lambda_choice import LambdaChoice, row_fields
from hf_fcmoe.federation.retention import new_residuals
from hf_fcmoe.federation.round_metrics import ClientScore, combine_scores
from hf_fcmoe.federation.server_state import sample_clients


@dataclass
class RoundOutcome:
    """What one round's train exchange produced, for the run directory and the metrics row."""

    result: AggregationResult
    updates: list[ClientUpdate]
    rejected: dict[str, str] = field(default_factory=dict)  # client -> reason (transport, node, hub)
    missing: dict[str, str] = field(default_factory=dict)  # sampled client -> why no update arrived
    bytes_up: int = 0
    bytes_down: int = 0


def reply_problem(reply: Message) -> str | None:
    """Why a reply carries no usable content (an error from Flower, or the node's own rejection)."""
    if reply.has_error():
        return f"no reply ({reply.error.reason.strip() or f'error code {reply.error.code}'})"
    if "rejected" in reply.content:
        return str(reply.content["rejected"]["reason"])
    return None


class FCMoEStrategy(Strategy):
    """hf_fcmoe's round on Flower's Message API; one instance per ServerApp run."""

    def __init__(
        self,
        hub: AggregationHub,
        client_ids: list[str],
        per_round: int,
        seed: int,
        instruction: dict,
        personal_scale: float,
        keeps_own_state: bool,
    ):
        self.hub = hub
        self.client_ids = list(client_ids)
        self.per_round = per_round
        self.seed = seed
        self.instruction = dict(instruction)  # recipe, fingerprint, run_key: sent with every message
        self.personal_scale = personal_scale
        self.keeps_own_state = keeps_own_state
        self.nodes: dict[str, int] = {}  # client id -> live node id (kept by the ServerApp's node directory)
        self.global_state: State = {}
        self.global_round = 0  # the round `global_state` belongs to
        self.holds_global: dict[str, int] = {}  # client -> round of the global its node acknowledged holding
        self.outcome: RoundOutcome | None = None
        self.eval_fields: dict = {}
        self.eval_missing: dict[str, str] = {}
        self.eval_bytes_down = 0
        self._sent: list[tuple[Message, str]] = []  # messages in flight and their client

    # ------------------------------------------------------------------ messages
    def _instruction(self, server_round: int, **extra) -> ConfigRecord:
        return ConfigRecord(
            {
                **self.instruction,
                "round": server_round,
                "personal_scale": self.personal_scale,
                "retention": float(getattr(self.hub, "retention_lambda", 0.0)),
                **extra,
            }
        )

    def _message(self, content: RecordDict, client_id: str, message_type: str, server_round: int) -> Message:
        message = Message(
            content=content, dst_node_id=self.nodes[client_id], message_type=message_type, group_id=str(server_round)
        )
        self._sent.append((message, client_id))
        return message

    def _sender(self, reply: Message) -> tuple[str, int]:
        """(client id, node id) a reply answers: matched by message id, so Flower's own error replies match too."""
        for message, cid in self._sent:
            if message.metadata.message_id == reply.metadata.reply_to_message_id:
                return cid, message.metadata.dst_node_id
        raise KeyError(f"reply to unknown message {reply.metadata.reply_to_message_id}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled client with a live node (the same seeded draw as the simulation)."""
        sampled = sample_clients(self.client_ids, self.per_round, self.seed, server_round)
        self._sent = []
        self.outcome = RoundOutcome(AggregationResult(self.global_state), [])
        messages = []
        for cid in sampled:
            if cid not in self.nodes:
                self.outcome.missing[cid] = "no live SuperNode for this client"
                continue
            content = RecordDict()
            seed = round_seed(self.seed, server_round, self.client_ids.index(cid))
            extra = {"seed": seed, "global_round": self.global_round, **dict(config)}
            if self.holds_global.get(cid) != self.global_round:  # else the node has it from the evaluate message
                put_state(content, "global", self.global_state)
                self.outcome.bytes_down += content["global"].count_bytes()
            content["instruction"] = self._instruction(server_round, **extra)
            messages.append(self._message(content, cid, "train", server_round))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check the replies, aggregate the accepted updates with the hub."""
        outcome = self.outcome
        updates, answered = [], set()
        for reply in replies:
            cid, node = self._sender(reply)
            answered.add(cid)
            if reply.has_error():  # Flower's own reply: the node is gone or the message expired
                outcome.missing[cid] = f"client {cid!r} (node {node}): {reply_problem(reply)}"
                log(INFO, "round %s: missing %s", server_round, outcome.missing[cid])
                continue
            problem = reply_problem(reply)
            if problem is None:
                try:
                    # the node sent only what differs from the global it started from (expert_slices.py)
                    update, _ = content_to_update(reply.content, self.global_state)
                    outcome.bytes_up += state_bytes(reply.content, "update")
                except (KeyError, TypeError, ValueError) as error:
                    problem = f"malformed train reply ({type(error).__name__}: {error})"
                else:
                    if update.client_id != cid:  # the hub checks enrolment, sizes and the round's fingerprint
                        problem = f"replied as client {update.client_id!r}"
            if problem is not None:
                outcome.rejected[cid] = f"client {cid!r} (node {node}): {problem}"
                log(INFO, "round %s: rejected %s", server_round, outcome.rejected[cid])
                continue
            updates.append(update)
        for message, cid in self._sent:
            if cid not in answered:
                outcome.missing[cid] = f"no reply from node {message.metadata.dst_node_id} within the round timeout"
        updates.sort(key=lambda update: self.client_ids.index(update.client_id))  # sampled order, not arrival
        result = self.hub.aggregate(self.global_state, updates, round=server_round)
        for cid, reason in (result.diagnostics or {}).get("rejected", {}).items():
            outcome.rejected[cid] = reason
        outcome.result, outcome.updates = result, [u for u in updates if u.client_id not in outcome.rejected]
        if not result.failed:
            self.global_state = result.global_state
        metrics = {"num_accepted": len(outcome.updates), "num_rejected": len(outcome.rejected)}
        return state_to_records(self.global_state)[0], MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every live client gets the new global; clients of this round also get their new residual (to keep).

        The residual is the only copy: the server forgets it once sent (the node keeps it in its state-dir).
        """
        residuals = {}
        if self.outcome is not None and not self.outcome.result.failed:
            residuals = new_residuals(self.outcome.result, self.keeps_own_state)
        self._sent, self.eval_missing, self.eval_bytes_down = [], {}, 0
        self.global_round = server_round
        messages = []
        for cid in self.client_ids:
            if cid not in self.nodes:
                self.eval_missing[cid] = "no live SuperNode for this client"
                continue
            content = RecordDict()
            put_state(content, "global", self.global_state)
            if cid in residuals:
                # only the tensors and expert slices with a conflict carry a residual; the node fills in zeros
                residual = residuals[cid]
                zeros = {key: torch.zeros_like(tensor) for key, tensor in residual.items()}
                put_state(content, "residual", residual, zeros, self.hub.layout)
                self.eval_bytes_down += state_bytes(content, "residual")
            content["instruction"] = self._instruction(server_round, **dict(config))
            self.eval_bytes_down += content["global"].count_bytes()
            messages.append(self._message(content, cid, "evaluate", server_round))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client scores of the global and the personalized adapter into the round's eval fields."""
        global_scores, local_scores, sizes, lambdas = {}, {}, {}, {}
        for reply in replies:
            cid, node = self._sender(reply)
            problem = reply_problem(reply)
            if problem is not None:
                self.eval_missing[cid] = f"client {cid!r} (node {node}): {problem}"
                self.holds_global.pop(cid, None)
                continue
            self.holds_global[cid] = server_round
            scores = reply.content["scores"]
            for prefix, target in (("global", global_scores), ("local", local_scores)):
                target[cid] = ClientScore(
                    float(scores[f"{prefix}_nll_sum"]),
                    int(scores[f"{prefix}_tokens"]),
                    scores.get(f"{prefix}_accuracy"),
                )
            sizes[cid] = int(scores["eval_rows"])
            choice = LambdaChoice.from_metrics(scores)  # retention_lambda_grid: the lambda the node chose
            if choice is not None:
                lambdas[cid] = choice
        order = [cid for cid in self.client_ids if cid in global_scores]
        global_scores = {cid: global_scores[cid] for cid in order}
        local_scores = {cid: local_scores[cid] for cid in order}
        if not order:
            self.eval_fields = {}
            return None
        classification = all(score.accuracy is not None for score in global_scores.values())
        self.eval_fields = combine_scores(global_scores, local_scores, sizes if classification else None)
        if lambdas:
            self.eval_fields.update(row_fields({cid: lambdas[cid] for cid in order if cid in lambdas}))
        return MetricRecord({"global_eval_loss": self.eval_fields["global_eval_loss"]})

    def summary(self) -> None:
        log(
            INFO,
            "FCMoEStrategy: method=%s, %s of %s clients per round",
            self.hub.method,
            self.per_round,
            len(self.client_ids),
        )

    # ------------------------------------------------------------------ discovery
    def hello_messages(self, node_ids: Iterable[int]) -> list[Message]:
        """Query messages asking new nodes who they are (client id, fingerprint; their data is checked)."""
        messages = []
        for node_id in node_ids:
            content = RecordDict({"instruction": self._instruction(0)})
            messages.append(Message(content=content, dst_node_id=node_id, message_type="query", group_id="hello"))
        return messages
