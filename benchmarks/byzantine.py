"""Byzantine clients: final global eval loss with 1 of 5 clients attacking, against the same run without attack.

The tiny recipe (recipes/tiny/fcmoe.yaml: tiny Mixtral, synthetic domains, Dirichlet 0.5) with 5 clients, all
sampled every round, 5 rounds. One client (``client_000``) trains honestly and then sends, relative to the
global it started from (d = its honest delta):
- ``scale100``: g + 100 d (the issue's scaled update);
- ``noise``: g + Gaussian noise of 100 x ||d|| (large-norm noise);
- ``signflip``: g - d.
Rows: fedavg and fcmoe with their defaults (fcmoe's default includes per-expert median norm clipping), fcmoe
without it (``norm_clip: null``, the behaviour before issue 12), and each with its robust option (fedavg:
coordinate-wise median; fcmoe: Multi-Krum). "clean" is the same method's run with every client honest; the other
columns are the relative change of the final global eval loss against it (goal: fcmoe default within +5%).

    python benchmarks/byzantine.py                       # 16 runs; writes benchmarks/results/byzantine.md
    python benchmarks/byzantine.py --rounds 1 --steps 2 --output /tmp/b.md   # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from hf_fcmoe.config import load_config
from hf_fcmoe.federation.simulation import FederatedSimulation

ROOT = Path(__file__).resolve().parents[1]
ATTACKER = "client_000"
ATTACKS = ("scale100", "noise", "signflip")
VARIANTS = {  # key: (row name, method, aggregation options)
    "fedavg": ("fedavg", "fedavg", {}),
    "fedavg_median": ("fedavg + median", "fedavg", {"robust_aggregator": "median"}),
    "fcmoe": ("fcmoe (default: norm_clip 2)", "fcmoe", {}),
    "fcmoe_krum": ("fcmoe + krum", "fcmoe", {"robust_aggregator": "krum"}),
    "fcmoe_noclip": ("fcmoe, norm_clip off (before issue 12)", "fcmoe", {"norm_clip": None}),
    "fcmoe_clip1": ("fcmoe, norm_clip 1", "fcmoe", {"norm_clip": 1.0}),
}
DEFAULT_VARIANTS = "fedavg,fedavg_median,fcmoe,fcmoe_krum,fcmoe_noclip"


def attacked_state(state: dict, global_state: dict, attack: str, seed: int) -> dict:
    """What the attacker sends instead of its honest state (all relative to the global it started from)."""
    deltas = {k: state[k].double() - global_state[k].double() for k in global_state}
    if attack == "scale100":
        new = {k: 100 * d for k, d in deltas.items()}
    elif attack == "signflip":
        new = {k: -d for k, d in deltas.items()}
    elif attack == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(d.shape, generator=gen, dtype=torch.float64) for k, d in deltas.items()}
        honest = torch.sqrt(sum(d.square().sum() for d in deltas.values()))
        scale = 100 * honest / torch.sqrt(sum(n.square().sum() for n in noise.values()))
        new = {k: scale * n for k, n in noise.items()}
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return {k: (global_state[k].double() + new[k]).to(global_state[k].dtype) for k in global_state}


class AttackedSimulation(FederatedSimulation):
    """The in-process engine with one client replaced by an attacker (after its honest local round)."""

    attack: str | None = None

    def _train_client(self, global_state, round_index, cid, callbacks):
        update = super()._train_client(global_state, round_index, cid, callbacks)
        if self.attack is None or cid != ATTACKER:
            return update
        return replace(update, state=attacked_state(update.state, global_state, self.attack, round_index))


def run(method: str, options: dict, attack: str | None, args, scratch: Path, initial: list | None = None) -> float:
    overrides = {
        "output_dir": str(scratch / f"{method}-{'-'.join(map(str, options.values()))}-{attack}"),
        "num_clients": 5,
        "clients_per_round": 5,
        "num_rounds": args.rounds,
        "max_steps": args.steps,
        "aggregation_method": method,
        "aggregation_options": options,
        "overwrite_output_dir": True,
    }
    config = load_config(ROOT / "recipes" / "tiny" / "fcmoe.yaml", overrides)
    sim = AttackedSimulation(config, progress=False)
    sim.attack = attack
    metrics = sim.run().metrics
    if initial is not None:
        initial.append(metrics[0]["global_eval_loss"])
    return float(metrics[-1]["global_eval_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"rows, from {', '.join(VARIANTS)}")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "byzantine.md"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_byzantine_"))
    started = time.perf_counter()
    rows, initial = [], []
    for key in args.variants.split(","):
        name, method, options = VARIANTS[key]
        clean = run(method, options, None, args, scratch, initial)
        losses = {attack: run(method, options, attack, args, scratch) for attack in ATTACKS}
        cells = " | ".join(f"{losses[a]:.4f} ({100 * (losses[a] / clean - 1):+.1f}%)" for a in ATTACKS)
        rows.append(f"| {name} | {clean:.4f} | {cells} |")
        print(rows[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    command = f"python benchmarks/byzantine.py --rounds {args.rounds} --steps {args.steps}"
    command += f" --variants {args.variants}" if args.variants != DEFAULT_VARIANTS else ""
    lines = [
        "# Byzantine clients: 1 of 5 attacks (tiny recipe)",
        "",
        f"`{command}` ({minutes:.1f} min). recipes/tiny/fcmoe.yaml with 5 clients, all sampled, {args.rounds} rounds",
        f"x {args.steps} local steps. Final global eval loss; in brackets the change against the same method's",
        "clean run (every client honest). Attacker `client_000` sends g + 100 d (scale100), g + noise of",
        "100 x ||d|| (noise) or g - d (signflip), d being its honest delta.",
        f"Global eval loss before training (round 0, every run): {initial[0]:.4f}.",
        "",
        "| method | clean | scale100 | noise | signflip |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
