"""Aggregation cost on Mixtral-8x7B-shaped LoRA adapters: fedavg vs fcmoe (factor / exact) vs a dense reference.

Usage:
    python benchmarks/aggregation.py            # full: 32 layers x 8 experts, hidden 4096, r=8, 8 clients (~4 GB)
    python benchmarks/aggregation.py --small    # the same code on tiny shapes, seconds

Every mode runs in its own subprocess on the same seeded inputs (global + 8 client states built key by key),
so peak RSS (ru_maxrss) is per mode; "working" memory is the peak minus the RSS once the inputs exist.
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
import subprocess
import sys
import time

import torch

MODES = {
    "fedavg": ("fedavg", {}),
    "fcmoe-factor": ("fcmoe", {"lowrank": "factor"}),
    "fcmoe-factor-noret": ("fcmoe", {"lowrank": "factor", "retention": False}),
    "fcmoe-exact": ("fcmoe", {"lowrank": "exact"}),
    "dense": (None, {}),
}


def build_layout(small: bool, rank: int):
    import transformers

    from hf_fcmoe.adapters import build_lora_config
    from hf_fcmoe.layout import ExpertLayout
    from hf_fcmoe.moe import get_family

    if small:
        config = transformers.MixtralConfig(
            num_hidden_layers=4, hidden_size=256, intermediate_size=896, num_attention_heads=8, num_key_value_heads=2
        )
    else:
        config = transformers.MixtralConfig()  # Mixtral-8x7B: 32 layers, 8 experts, hidden 4096, intermediate 14336
    lora_config = build_lora_config(get_family(config), r=rank, targets=["experts", "router", "attention"])
    return ExpertLayout.from_configs(config, lora_config)


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


def worker(args) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    layout = build_layout(args.small, args.rank)
    glob, updates = build_inputs(layout, args.clients, args.seed)
    baseline = rss_mb()
    method, options = MODES[args.worker]
    start = time.perf_counter()
    diag = {}
    if method is None:
        dense_reference(layout, glob, updates, args.dense_layers)
    else:
        from hf_fcmoe.aggregation import AggregationHub

        result = AggregationHub(layout, method, **options).aggregate(glob, updates, round=1)
        diag = {k: result.diagnostics.get(k) for k in ("conflict_rate", "truncation_error")}
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.worker, "time_s": elapsed, "peak_mb": peak, "baseline_mb": baseline, **diag}))


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
    base_cmd += ["--dense-layers", str(args.dense_layers), "--threads", str(args.threads)] + (
        ["--small"] if args.small else []
    )
    for mode in args.modes.split(","):
        out = subprocess.run(base_cmd + ["--worker", mode], capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"  ran {mode}: {rows[mode]['time_s']:.2f} s", file=sys.stderr)
    if "dense" in rows:
        rows["dense"]["time_s"] *= layout.num_layers / args.dense_layers
    ref = rows.get("fedavg")
    lines = [
        f"Adapter: {layout.num_layers} layers x {layout.num_experts} experts, r={args.rank}, {args.clients} clients, "
        f"{size_mb:.0f} MB fp32 per client; threads: {args.threads or torch.get_num_threads()}",
        f"Machine: plain matmul {gflops:.0f} GFLOP/s (fp32 {1024 if args.small else 4096}^2), "
        f"thin Gram {thin_gflops:.0f} GFLOP/s",
        f"Exact mode flops: {done / 1e9:.1f} GFLOP done (K=(N+1)r Grams + apply), floor {floor / 1e9:.1f} GFLOP "
        f"-> floor time {floor / gflops / 1e9:.2f} s at plain-matmul speed",
        "",
        "| mode | time (s) | x fedavg time | peak RSS (MB) | x fedavg peak | working MB (peak - inputs) | notes |",
        "|---|---|---|---|---|---|---|",
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
        time_ratio = f"{row['time_s'] / ref['time_s']:.2f}" if ref else "-"
        peak_ratio = f"{row['peak_mb'] / ref['peak_mb']:.2f}" if ref else "-"
        working = row["peak_mb"] - row["baseline_mb"]
        cells = [mode, f"{row['time_s']:.2f}", time_ratio, f"{row['peak_mb']:.0f}", peak_ratio, f"{working:.0f}"]
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
