"""Training-step time and peak memory of per-expert LoRA: PEFT's ParamWrapper against the routed-token forward.

Side by side, same run: for each model size (a 2-layer Mixtral, 8 experts, top-2, batch 4 x 256 tokens,
LoRA r=8), three configurations train with AdamW on the same data from the same seed:

- (a) ``attention``: LoRA on q/k/v/o only (the cost LoRA on experts should approach);
- (b) ``peft``: attention + experts through PEFT's `ParamWrapper` (materialises W + delta every forward);
- (c) ``routed``: the same adapter through `hf_fcmoe.training.expert_lora` (routed tokens only).

Every measurement runs in its own subprocess with one thread, and the configurations alternate
(a, b, c, a, b, c, ...) so drift of a shared machine hits them alike. Time is the median CPU seconds
(`time.process_time`, one thread: what the step computes, robust to other processes on shared cores)
per step over all timed steps, with the wall-clock ratios beside it. Memory is the peak resident set
size of the process during the timed steps (Linux VmHWM, reset through /proc/self/clear_refs after the
warm-up), and its increase over the resident size when timing starts (what a step needs on top of the
weights and optimizer state).

    python benchmarks/expert_lora.py                       # three sizes, 3 repeats x 4 timed steps
    python benchmarks/expert_lora.py --sizes 64x128 --repeats 1 --steps 1 --warmup 0   # smoke run
    python benchmarks/expert_lora.py --demo                # also: tiny demo wall time, routed vs peft
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("attention", "peft", "routed")
ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(config: str, hidden: int, intermediate: int, steps: int, warmup: int, rank: int) -> dict:
    """One configuration in this process: build, train `warmup + steps` steps, report times and memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_fcmoe.training.expert_lora import configure_expert_lora_forward

    torch.set_num_threads(1)
    heads = max(1, hidden // 64)
    model_config = AutoConfig.for_model(
        "mixtral",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=1024,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config)
    experts = [] if config == "attention" else ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=experts or None,
    )
    model = get_peft_model(model, lora_config)
    routed = configure_expert_lora_forward(model, "routed" if config == "routed" else "peft")
    assert routed == (config == "routed"), f"{config}: routed forward active = {routed}"
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model_config.vocab_size, (4, 256), generator=generator)

    def step() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - cpu_start, time.perf_counter() - start

    for _ in range(warmup):
        step()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark (VmHWM)
    rss_start = _rss_kib("VmRSS")
    cpu, wall = zip(*(step() for _ in range(steps)))
    return {
        "cpu": cpu,
        "wall": wall,
        "peak_mib": _rss_kib("VmHWM") / 1024,
        "step_mib": (_rss_kib("VmHWM") - rss_start) / 1024,
    }


def _run_worker(config: str, hidden: int, intermediate: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--sizes", f"{hidden}x{intermediate}"]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _bench_sizes(args, lines: list[str]) -> None:
    lines.append(
        f"2-layer Mixtral, 8 experts, top-2, batch 4x256, LoRA r={args.rank}, AdamW, 1 thread; "
        f"{args.repeats} repeats x {args.steps} timed steps after {args.warmup} warm-up, configurations alternating"
    )
    lines.append("")
    lines.append(
        "| hidden / intermediate | (a) attention CPU s/step | (b) peft | (c) routed | c/a time | b/c speed-up "
        "| wall c/a, b/c | peak MiB a / b / c | c/a peak | step MiB a / b / c |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        hidden, intermediate = (int(v) for v in size.split("x"))
        results = {config: [] for config in CONFIGS}
        for _ in range(args.repeats):
            for config in CONFIGS:
                results[config].append(_run_worker(config, hidden, intermediate, args))
        time_of = {c: statistics.median(t for r in results[c] for t in r["cpu"]) for c in CONFIGS}
        wall = {c: statistics.median(t for r in results[c] for t in r["wall"]) for c in CONFIGS}
        peak = {c: max(r["peak_mib"] for r in results[c]) for c in CONFIGS}
        step_mib = {c: max(r["step_mib"] for r in results[c]) for c in CONFIGS}
        a, b, c = (time_of[k] for k in CONFIGS)
        lines.append(
            f"| {hidden} / {intermediate} | {a:.3f} | {b:.3f} | {c:.3f} | {c / a:.2f}x | {b / c:.2f}x "
            f"| {wall['routed'] / wall['attention']:.2f}x, {wall['peft'] / wall['routed']:.2f}x "
            f"| {peak['attention']:.0f} / {peak['peft']:.0f} / {peak['routed']:.0f} | "
            f"{peak['routed'] / peak['attention']:.2f}x | "
            f"{step_mib['attention']:.0f} / {step_mib['peft']:.0f} / {step_mib['routed']:.0f} |"
        )
        print(lines[-1], flush=True)
        _write(args.output, lines)  # row by row: an interrupted run keeps what it measured


def _write(output: Path | None, lines: list[str]) -> None:
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("\n".join(lines) + "\n")


def _bench_demo(args, lines: list[str]) -> None:
    """Wall time of the tiny demo recipe, expert_lora_forward routed vs peft, alternating."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    walls: dict[str, list[float]] = {"routed": [], "peft": []}
    cpus: dict[str, list[float]] = {"routed": [], "peft": []}
    for _ in range(args.demo_repeats):
        for mode in walls:
            with tempfile.TemporaryDirectory(prefix="bench_demo_") as out:
                cmd = [sys.executable, "-m", "hf_fcmoe.cli", "simulate", "--config", str(ROOT / args.demo_recipe)]
                cmd += ["--output_dir", out, "--overwrite_output_dir", "true", "--expert_lora_forward", mode]
                start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                walls[mode].append(time.perf_counter() - start)
                cpus[mode].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    wall, cpu = ({m: statistics.median(v[m]) for m in v} for v in (walls, cpus))
    lines.append("")
    lines.append(
        f"Demo `{args.demo_recipe}` (whole CLI run, median of {args.demo_repeats}, alternating, OMP_NUM_THREADS=1): "
        + "; ".join(
            f"{what} peft {v['peft']:.1f} s, routed {v['routed']:.1f} s (peft/routed {v['peft'] / v['routed']:.2f}x)"
            for what, v in (("wall", wall), ("CPU", cpu))
        )
    )
    print(lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x896,512x1792,1024x3584", help="hidden x intermediate, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--demo", action="store_true", help="also time the tiny demo recipe, routed vs peft")
    parser.add_argument("--demo-only", action="store_true", help="only the demo timing")
    parser.add_argument("--demo-recipe", default="recipes/tiny/fcmoe.yaml")
    parser.add_argument("--demo-repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        hidden, intermediate = (int(v) for v in args.sizes.split("x"))
        print(json.dumps(_worker(args.worker, hidden, intermediate, args.steps, args.warmup, args.rank)))
        return
    command = "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]])
    lines = [f"$ {command}", f"load before: {_uptime()}", ""]
    print("\n".join(lines), flush=True)
    if not args.demo_only:
        _bench_sizes(args, lines)
    if args.demo or args.demo_only:
        _bench_demo(args, lines)
    lines += ["", f"load after: {_uptime()}"]
    print(lines[-1])
    _write(args.output, lines)


if __name__ == "__main__":
    main()
