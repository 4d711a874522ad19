"""One local round on several processes of a node: `accelerate launch -m hf_fcmoe.federation.flower.local_round JOB`.

The ClientApp writes JOB/job.json (recipe, node settings, seed, fingerprint) and the start state (and
lambda * residual) as safetensors; every process builds the same session and trains data-parallel; the main
process writes JOB/update.safetensors and JOB/stats.json (expert counts summed over the processes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_fcmoe.federation.flower.client_app import NodeSession
from hf_fcmoe.federation.flower.node import NodeSettings
from hf_fcmoe.federation.run_dir import RunDirectory


def run_job(job: Path) -> None:
    from accelerate import PartialState
    from accelerate.utils import reduce

    spec = json.loads((job / "job.json").read_text())
    settings = NodeSettings.from_node_config(spec["node_config"])
    session = NodeSession(settings, spec["recipe"], spec["fingerprint"])
    start = RunDirectory.load_tensors(job / "start.safetensors")
    retained_path = job / "retained.safetensors"
    retained = RunDirectory.load_tensors(retained_path) if retained_path.exists() else None
    update = session.worker.train(settings.client_id, session.splits, start, seed=int(spec["seed"]), retained=retained)
    state = PartialState()
    counts = reduce(update.expert_counts.to(state.device), reduction="sum").cpu()
    if state.is_main_process:
        RunDirectory.save_tensors(job / "update.safetensors", update.state)
        stats = {
            "num_examples": update.num_examples,
            "train_loss": update.train_loss,
            "expert_counts": counts.tolist(),
            "metrics": {**update.metrics, "num_processes": state.num_processes},
        }
        (job / "stats.json").write_text(json.dumps(stats))
    state.wait_for_everyone()


if __name__ == "__main__":
    run_job(Path(sys.argv[1]))
