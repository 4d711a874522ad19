"""Aggregation cost on Mixtral-8x7B-shaped LoRA adapters: fedavg vs fcmoe (factor / exact) vs a dense reference.

Usage:
    python benchmarks/aggregation.py            # full: 32 layers x 8 experts, hidden 4096, r=8, 8 clients (~4 GB)
    python benchmarks/aggregation.py --small    # the same code on tiny shapes, seconds

Every mode runs in its own subprocess on the same seeded inputs (global + 8 client states built key by key),
so peak RSS (ru_maxrss) is per mode; "working" memory is the peak minus the RSS once the inputs exist.
Each mode aggregates ``--repeat`` times on the same inputs: the first call is reported as "cold" (its outputs
land on memory the process never touched; on a VM that is the guest's first touch of it), the median of the
others as "warm", the steady state of a server that aggregates round after round. The ratios use warm times.

Workers run with glibc told to keep freed memory (``--allocator retain``: MALLOC_MMAP_THRESHOLD_=32 MB,
MALLOC_TRIM_THRESHOLD_=16 GB), the way PyTorch's CPU tuning guide suggests jemalloc/tcmalloc: otherwise every
round's outputs are unmapped and faulted in again, which on this VM cost ~1.4 s per GB and dominated FedAvg
(0.98 s warm instead of 0.43 s). ``--allocator system`` measures glibc's defaults.

"read pass" is the time to read every client state and the global once (a sum per tensor): the memory floor.
FedAvg needs two such passes (validation, then the weighted sum); FC-MoE's factor mode three (validation, the
Gram pass that decides weights and conflicts, then the combine), so ~1.5x FedAvg is its floor when every
pass runs at memory speed, plus the write of the residuals.
Client updates share a common direction plus noise; one client pushes against it (realistic: a few percent
of expert updates conflict), so fcmoe's projection and retention paths do real work.

The dense reference materialises every expert's product delta B_i @ A_i per client, takes the weighted sum and
re-factorises it to rank r with a randomized truncated SVD (the way PEFT's *_svd / mergekit-style merges work,
but with torch.svd_lowrank instead of a full SVD, so the reference is, if anything, flattered). It runs on
``--dense-layers`` layers and is extrapolated linearly to all layers (the cost is identical per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = {
    "read-pass": ("read", {}),
    "fedavg": ("fedavg", {}),
    "fcmoe-factor": ("fcmoe", {"lowrank": "factor"}),
    "fcmoe-factor-noret": ("fcmoe", {"lowrank": "factor", "retention": False}),
    # conflicts decided on the concatenated factors (the default before issue 16 moved them to the products)
    "fcmoe-factor-factorspace": ("fcmoe", {"lowrank": "factor", "conflict_space": "factor"}),
    "fcmoe-exact": ("fcmoe", {"lowrank": "exact"}),
    "dense": (None, {}),
}


def build_layout(small: bool, rank: int):
    import transformers

    from hf_fcmoe.adapters.lora import build_lora_config, expert_layout_from_configs
    from hf_fcmoe.models.families import get_family

    if small:
        config = transformers.MixtralConfig(
            num_hidden_layers=4, hidden_size=256, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2
        )
    else:
        config = transformers.MixtralConfig()  # Mixtral-8x7B: 32 layers, 8 experts, hidden 4096, intermediate 14336
    lora_config = build_lora_config(get_family(config), r=rank, targets=["experts", "router", "attention"])
    return expert_layout_from_configs(config, lora_config)


def build_inputs(layout, clients: int, seed: int):
    """Seeded global + client states, one key at a time (no full-size temporaries)."""
    from hf_fcmoe.aggregation import ClientUpdate

    gen = torch.Generator().manual_seed(seed)
    glob = {}
    states = [dict() for _ in range(clients)]
    signs = [1.0] * (clients - 1) + [-0.3]  # the last client pushes against the shared direction
    for key, shape in layout.expected_shapes().items():
        glob[key] = torch.randn(shape, generator=gen).mul_(0.02)
        shared = torch.randn(shape, generator=gen).mul_(1e-3)
        for i in range(clients):
            state = torch.randn(shape, generator=gen).mul_(5e-4)
            state.add_(shared, alpha=signs[i]).add_(glob[key])
            states[i][key] = state
        del shared
    counts_gen = torch.Generator().manual_seed(seed + 1)
    updates = [
        ClientUpdate(
            f"client{i}",
            states[i],
            100 + 10 * i,
            torch.randint(1, 100, (layout.num_layers, layout.num_experts), generator=counts_gen),
        )
        for i in range(clients)
    ]
    return glob, updates


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def dense_reference(layout, glob, updates, layers: int) -> None:
    """Materialise product deltas, weighted-sum them, re-factorise with a randomized SVD (expert pairs only)."""
    sizes = torch.tensor([float(u.num_examples) for u in updates])
    weights = (sizes / sizes.sum()).tolist()
    for pair in layout.by_kind("expert"):
        if pair.layer >= layers:
            continue
        g_b, g_a = pair.expert_factors(glob)
        client_factors = [pair.expert_factors(u.state) for u in updates]
        for e in range(pair.num_experts):
            base = g_b[e] @ g_a[e]
            merged = base.clone()
            for w, (b, a) in zip(weights, client_factors):
                product = b[e] @ a[e]
                merged.add_(product.sub_(base), alpha=w)
                del product
            u, s, v = torch.svd_lowrank(merged, q=pair.rank + 8, niter=2)
            _ = (u[:, : pair.rank] * s[: pair.rank], v[:, : pair.rank].T)
            del merged, base


def read_pass(glob, updates) -> None:
    """Read every tensor of the global and the client states once (the memory floor of any method)."""
    for state in [glob] + [u.state for u in updates]:
        for tensor in state.values():
            tensor.sum()


def worker(args) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    layout = build_layout(args.small, args.rank)
    glob, updates = build_inputs(layout, args.clients, args.seed)
    baseline = rss_mb()
    method, options = MODES[args.worker]
    diag = {}
    times = []
    for _ in range(1 if method is None else args.repeat):
        start = time.perf_counter()
        if method is None:
            dense_reference(layout, glob, updates, args.dense_layers)
        elif method == "read":
            read_pass(glob, updates)
        else:
            from hf_fcmoe.aggregation import AggregationHub

            result = AggregationHub(layout, method, **options).aggregate(glob, updates, round=1)
            diag = {k: result.diagnostics.get(k) for k in ("conflict_rate", "truncation_error")}
            del result
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
    row = {"mode": args.worker, "cold_s": times[0], "time_s": warm, "peak_mb": peak, "baseline_mb": baseline}
    print(json.dumps({**row, **diag}))


def matmul_gflops(size: int) -> tuple[float, float]:
    """Plain square matmul GFLOP/s and thin Gram (X^T X, X tall with 72 columns) GFLOP/s, best of 3."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    thin = torch.randn(8, 7 * size, 72)
    best_sq = best_thin = float("inf")
    torch.mm(a, b)
    for _ in range(3):
        t = time.perf_counter()
        torch.mm(a, b)
        best_sq = min(best_sq, time.perf_counter() - t)
        t = time.perf_counter()
        torch.bmm(thin.transpose(1, 2), thin)
        best_thin = min(best_thin, time.perf_counter() - t)
    return 2 * size**3 / best_sq / 1e9, 2 * 8 * 7 * size * 72 * 72 / best_thin / 1e9


def exact_flops(layout, clients: int) -> tuple[float, float]:
    """(flops this implementation does in exact mode, the ~60 GFLOP floor of the issue) over expert pairs.

    Implementation: two Gram products over K = (N+1) r stacked columns (global included) plus two thin apply
    products. Floor: one symmetric N r x N r Gram product per factor (half of a general one).
    """
    done = floor = 0.0
    for pair in layout.by_kind("expert"):
        k = (clients + 1) * pair.rank
        span = pair.out_features + pair.in_features
        done += pair.num_experts * (2 * span * k * k + 2 * span * k * pair.rank)
        floor += pair.num_experts * span * (clients * pair.rank) ** 2
    return done, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke run in seconds)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dense-layers", type=int, default=None, help="layers the dense reference runs on (extrapolated)"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--allocator", choices=["retain", "system"], default="retain")
    parser.add_argument("--repeat", type=int, default=4, help="aggregations per mode (first = cold, rest = warm)")
    parser.add_argument(
        "--output",
        default=None,
        help="markdown file to write the report to (default: benchmarks/results/aggregation.md for the full run)",
    )
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    layout = build_layout(args.small, args.rank)
    if args.dense_layers is None:
        args.dense_layers = layout.num_layers if args.small else 2
    args.dense_layers = min(args.dense_layers, layout.num_layers)
    if args.worker:
        worker(args)
        return
    size_mb = sum(a * b for a, b in layout.expected_shapes().values()) * 4 / 2**20
    if args.threads:  # the matmul floor at the workers' thread count
        torch.set_num_threads(args.threads)
    gflops, thin_gflops = matmul_gflops(1024 if args.small else 4096)
    done, floor = exact_flops(layout, args.clients)
    rows = {}
    base_cmd = [
        sys.executable,
        __file__,
        "--clients",
        str(args.clients),
        "--rank",
        str(args.rank),
        "--seed",
        str(args.seed),
    ]
    base_cmd += ["--dense-layers", str(args.dense_layers), "--threads", str(args.threads)]
    base_cmd += ["--repeat", str(args.repeat)]
    base_cmd += ["--small"] if args.small else []
    env = dict(os.environ)
    if args.allocator == "retain":
        env.update(MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(16 << 30))
    for mode in args.modes.split(","):
        run = subprocess.run(base_cmd + ["--worker", mode], capture_output=True, text=True, check=True, env=env)
        out = run.stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"  ran {mode}: {rows[mode]['time_s']:.2f} s", file=sys.stderr)
    if "dense" in rows:
        rows["dense"]["time_s"] *= layout.num_layers / args.dense_layers
        rows["dense"]["cold_s"] *= layout.num_layers / args.dense_layers
    read = rows.get("read-pass")
    ref = rows.get("fedavg")
    lines = [
        f"Adapter: {layout.num_layers} layers x {layout.num_experts} experts, r={args.rank}, {args.clients} clients, "
        f"{size_mb:.0f} MB fp32 per client; threads: {args.threads or torch.get_num_threads()}; "
        f"allocator: {args.allocator}",
        f"Machine: plain matmul {gflops:.0f} GFLOP/s (fp32 {1024 if args.small else 4096}^2), "
        f"thin Gram {thin_gflops:.0f} GFLOP/s",
        f"Exact mode flops: {done / 1e9:.1f} GFLOP done (K=(N+1)r Grams + apply), floor {floor / 1e9:.1f} GFLOP "
        f"-> floor time {floor / gflops / 1e9:.2f} s at plain-matmul speed",
        "",
        f"Times: warm = median of {max(1, args.repeat - 1)} aggregations after the first (cold) one in one process."
        + (f" One read pass over all states: {read['time_s']:.2f} s warm." if read else ""),
        "",
        "| mode | warm time (s) | x fedavg | read passes | cold time (s) | x fedavg cold | peak RSS (MB) "
        "| x fedavg peak | working MB (peak - inputs) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in rows.items():
        notes = []
        if row.get("conflict_rate") is not None and mode != "fedavg":
            notes.append(f"conflict rate {row['conflict_rate']:.3f}")
        if row.get("truncation_error"):
            notes.append(f"trunc. err max {row['truncation_error']['max']:.3f}")
        if mode == "fcmoe-exact":
            notes.append(
                f"{row['time_s'] / (floor / gflops / 1e9):.1f}x the floor; "
                f"{done / row['time_s'] / 1e9:.0f} GFLOP/s achieved"
            )
        if mode == "dense":
            notes.append(f"extrapolated from {args.dense_layers} layer(s); experts only")
            if "fcmoe-exact" in rows:
                notes.append(f"{row['time_s'] / rows['fcmoe-exact']['time_s']:.0f}x exact-mode time")
        if mode == "dense":
            notes.append("run once (cold)")
        time_ratio = f"{row['time_s'] / ref['time_s']:.2f}" if ref else "-"
        cold_ratio = f"{row['cold_s'] / ref['cold_s']:.2f}" if ref else "-"
        passes = f"{row['time_s'] / read['time_s']:.1f}" if read else "-"
        peak_ratio = f"{row['peak_mb'] / ref['peak_mb']:.2f}" if ref else "-"
        working = row["peak_mb"] - row["baseline_mb"]
        cells = [mode, f"{row['time_s']:.2f}", time_ratio, passes, f"{row['cold_s']:.2f}", cold_ratio]
        cells += [f"{row['peak_mb']:.0f}", peak_ratio, f"{working:.0f}"]
        lines.append("| " + " | ".join(cells + ["; ".join(notes)]) + " |")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    default_output = os.path.join(os.path.dirname(__file__), "results", "aggregation.md")
    output = args.output or (None if args.small else default_output)
    if output:
        command = " ".join(["python", "benchmarks/aggregation.py"] + sys.argv[1:])
        with open(output, "w") as handle:
            handle.write(f"```\n{command}\n```\n\n{report}")
        print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
