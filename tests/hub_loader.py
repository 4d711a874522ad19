"""Runs in a fresh process with HF_ENDPOINT pointing at the loopback Hub (huggingface_hub reads it at import):
loads what a push published, the way a user would, and writes what it measured as JSON.

``python -m tests.hub_loader SPEC.json OUT.json``; SPEC: run_dir, repo_id, base_repo_id, clients.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard, hf_hub_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fcmoe.adapters.loading import load_adapter_model
from hf_fcmoe.config import load_config
from hf_fcmoe.data.federated import load_federated_data
from hf_fcmoe.federation.client import ClientWorker
from hf_fcmoe.metrics.loss import nll_sum_and_count

PROBE = torch.tensor([[5, 17, 42, 99, 120, 7, 64, 33]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run, repo, base_id, clients = Path(spec["run_dir"]), spec["repo_id"], spec["base_repo_id"], spec["clients"]
    config = load_config(run / "config.yaml")
    data = load_federated_data(config.data_spec())
    base = lambda: AutoModelForCausalLM.from_pretrained(base_id)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(base_id)
    out: dict = {"eval": {}, "union": {}, "multi": {}, "cards": {}}

    # eval losses of every published revision, on the splits metrics.jsonl used (round_metrics.py)
    revisions = {"main": None, **{tag: None for tag in spec["tags"]}}
    revisions.update({f"client-{cid}": cid for cid in clients})
    worker, splits, reference = None, {}, {}
    for revision, own in revisions.items():
        model = PeftModel.from_pretrained(base(), repo, revision=revision)
        model.eval()
        reference[revision] = logits(model)
        if worker is None:
            worker = ClientWorker(model, tokenizer, config)
            splits = {cid: worker.prepare(data.train[cid], data.eval[cid]) for cid in data.client_ids}
        scores = {}
        for cid in [own] if own else data.client_ids:
            total, count = nll_sum_and_count(model, splits[cid].eval, worker.collator, config.eval_batch_size)
            scores[cid] = (total, count)
        out["eval"][revision] = {cid: total / count for cid, (total, count) in scores.items()}
        if own is None:
            out["union"][revision] = sum(t for t, _ in scores.values()) / sum(c for _, c in scores.values())

    # several adapters in one base, switched with set_adapter
    model = PeftModel.from_pretrained(base(), repo, adapter_name="global")
    for cid in clients:
        model.load_adapter(repo, adapter_name=cid, revision=f"client-{cid}")
    model.eval()
    for name, revision in [("global", "main"), *[(cid, f"client-{cid}") for cid in clients]]:
        model.set_adapter(name)
        out["multi"][name] = float((logits(model) - reference[revision]).abs().max())
    names = ["main", *[f"client-{cid}" for cid in clients]]
    out["pairwise_min_diff"] = min(
        float((reference[a] - reference[b]).abs().max()) for i, a in enumerate(names) for b in names[i + 1 :]
    )

    # transformers' own route (a revision goes through adapter_kwargs there)
    client_rev = f"client-{clients[0]}"
    plain = base()
    plain.load_adapter(repo)
    out["transformers_default_diff"] = float((logits(plain) - reference["main"]).abs().max())
    branch = base()
    branch.load_adapter(repo, adapter_kwargs={"revision": client_rev})
    out["transformers_branch_diff"] = float((logits(branch) - reference[client_rev]).abs().max())
    named = base()
    try:
        named.load_adapter(repo, adapter_name="client", adapter_kwargs={"revision": client_rev})
        named.set_adapter("client")
        out["transformers_named_diff"] = float((logits(named) - reference[client_rev]).abs().max())
    except ValueError as error:
        out["transformers_named_error"] = str(error)

    # cards: metadata, and the loading snippet run as written
    for revision in ["main", f"client-{clients[0]}"]:
        card = ModelCard.load(hf_hub_download(repo, "README.md", revision=revision))
        snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
        namespace: dict = {}
        exec(snippet, namespace)  # noqa: S102 - the card's own snippet, as a user would paste it
        out["cards"][revision] = {
            "base_model": card.data.base_model,
            "library_name": card.data.library_name,
            "pipeline_tag": card.data.pipeline_tag,
            "license": card.data.license,
            "tags": card.data.tags,
            "has_plot": "loss.png" in card.text,
            "snippet_diff": float((logits(namespace["model"]) - reference[revision]).abs().max()),
        }
    local = load_adapter_model(run / "global")
    out["local_vs_hub_diff"] = float((logits(local) - reference["main"]).abs().max())
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
