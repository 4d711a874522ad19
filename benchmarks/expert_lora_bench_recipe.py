"""Wall time of the offline bench recipe with PEFT's ParamWrapper expert forward against the routed-token one.

Issue 14 asks for the recipe's wall time before (``expert_lora_forward: peft``) and after (``routed``, the
default). Both benches run at the same time, one thread each, on one pretrained base (trained once, then
copied), so a shared machine's load hits them alike; each run's wall time is read from its run directory
(``config.yaml`` is written when it starts, ``report.md`` when it ends), and only runs both benches finished
are compared. The same runs also show how far the two numerically equivalent forwards drift apart over the
rounds (fp32 rounding, amplified by top-k routing): the noise floor of any comparison of two methods.

    python benchmarks/expert_lora_bench_recipe.py --output_dir runs/bench-forward                # alpha 0.1, seed 0
    python benchmarks/expert_lora_bench_recipe.py --output_dir runs/bench-forward --report_only  # table again
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = ("peft", "routed")
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "bench" / "offline.yaml"


def _run_benches(output_dir: Path, alpha: float, seed: int) -> dict[str, float]:
    """Pretrain the base once, then both benches at once; whole-bench wall seconds per mode."""
    from hf_fcmoe.bench.config import load_bench_config
    from hf_fcmoe.bench.runner import prepare_base

    prepare_base(load_bench_config(RECIPE, {"output_dir": str(output_dir / "peft")}))
    if not (output_dir / "routed" / "base").exists():
        shutil.copytree(output_dir / "peft" / "base", output_dir / "routed" / "base")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started, processes = time.time(), {}
    for mode in MODES:
        command = [
            sys.executable, "-m", "hf_fcmoe.cli", "bench", "--config", str(RECIPE), "--workers", "1",
            "--output_dir", str(output_dir / mode), "--alphas", f"[{alpha}]", "--seeds", f"[{seed}]",
            "--run.expert_lora_forward", mode,
        ]  # fmt: skip
        log = open(output_dir / f"{mode}.log", "w")  # noqa: SIM115 (closed with the process)
        processes[mode] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    wall = {}
    for mode, (process, log) in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"the {mode} bench failed: see {output_dir / f'{mode}.log'}")
        log.close()
        wall[mode] = time.time() - started
    return wall


def _wall_seconds(run: Path) -> float:
    """From the run's config.yaml (written at its start) to its report.md (written at its end)."""
    return (run / "report.md").stat().st_mtime - (run / "config.yaml").stat().st_mtime


def _metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def report(output_dir: Path, alpha: float, seed: int) -> str:
    """Per-run wall time and loss drift of every run both benches finished."""
    runs = {mode: output_dir / mode / "runs" / f"alpha_{alpha:g}" / f"seed_{seed}" for mode in MODES}
    names = sorted(p.name for p in runs["peft"].iterdir() if (p / "report.md").exists())
    names = [name for name in names if (runs["routed"] / name / "report.md").exists()]
    lines = [
        f"Offline bench recipe (`{RECIPE.relative_to(ROOT)}`), alpha {alpha:g}, seed {seed}: both expert forwards run",
        "at the same time, one thread each; wall seconds per run from its run directory.",
        "",
        "| run | peft s | routed s | peft / routed | final global eval loss: peft | routed "
        "| largest gap, rounds 0-2 | final gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = dict.fromkeys(MODES, 0.0)
    for name in names:
        seconds = {
            mode: (runs[mode] / name / "report.md").stat().st_mtime
            - (runs[mode] / name / "config.yaml").stat().st_mtime
            for mode in MODES
        }
        totals = {mode: totals[mode] + seconds[mode] for mode in MODES}
        rows = {mode: _metric_rows(runs[mode] / name) for mode in MODES}
        gaps = [abs(a["global_eval_loss"] - b["global_eval_loss"]) for a, b in zip(rows["peft"], rows["routed"])]
        final = {mode: rows[mode][-1]["global_eval_loss"] for mode in MODES}
        lines.append(
            f"| {name} | {seconds['peft']:.0f} | {seconds['routed']:.0f} | {seconds['peft'] / seconds['routed']:.2f} "
            f"| {final['peft']:.4f} | {final['routed']:.4f} | {max(gaps[:3]):.1e} | {gaps[-1]:.1e} |"
        )
    if names:
        lines.append(
            f"| **{len(names)} runs** | {totals['peft']:.0f} | {totals['routed']:.0f} "
            f"| **{totals['peft'] / totals['routed']:.2f}** | | | | |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report_only", action="store_true", help="only write the table of finished runs")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    header = ""
    if not args.report_only:
        wall = _run_benches(args.output_dir, args.alpha, args.seed)
        header = f"Whole bench wall: peft {wall['peft']:.0f} s, routed {wall['routed']:.0f} s.\n\n"
    text = header + report(args.output_dir, args.alpha, args.seed)
    print(text)
    if args.output is not None:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
