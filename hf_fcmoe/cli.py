"""`hf-fcmoe`: the command line. Each sub-command reads a recipe YAML; `--key value` overrides any field.

Every heavy import happens inside the sub-command that needs it, so `hf-fcmoe --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_overrides(tokens: Sequence[str]) -> dict:
    """``--key value`` / ``--key=value`` pairs into a dict (values read as YAML scalars/lists)."""
    if not tokens:  # `push` takes none: it must not import the config (torch, transformers) for nothing
        return {}
    from hf_fcmoe.config import parse_override_value

    overrides: dict = {}
    tokens = list(tokens)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise SystemExit(f"hf-fcmoe: expected --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise SystemExit(f"hf-fcmoe: option --{key} needs a value")
            value = tokens[i + 1]
            i += 1
        overrides[key.replace("-", "_")] = parse_override_value(value)
        i += 1
    return overrides


def _launched_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (read from the launcher's environment), else 0."""
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def _accelerate_launch(args: argparse.Namespace) -> int:
    """Re-run this command under `accelerate launch --config_file ...` (the settings were checked here first)."""
    import subprocess

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config]
    command += ["-m", "hf_fcmoe.cli", "simulate", "--config", args.config, *(["--resume"] if args.resume else [])]
    return subprocess.run([*command, *args.raw_overrides]).returncode


def _simulate(args: argparse.Namespace, overrides: dict) -> int:
    from hf_fcmoe.config import load_config
    from hf_fcmoe.federation.simulation import check_output_dir, run_simulation

    # every setting and the output folder are checked before any process group exists
    config = load_config(args.config, overrides)
    check_output_dir(config, args.resume)
    if args.accelerate_config:
        return _accelerate_launch(args)
    from accelerate import PartialState

    result = run_simulation(config, resume=args.resume)
    if not PartialState().is_main_process:
        return 0
    last = result.metrics[-1]
    print(
        f"\nfinished {last['round']} rounds of {last['method']}: global eval loss {last['global_eval_loss']:.4f}, "
        f"personalized (mean) {last['local_eval_loss']:.4f}"
    )
    print(f"global adapter:        {result.global_dir}")
    print(
        f"personalized adapters: {result.global_dir.parent / 'personalized'}/<client_id> "
        f"({len(result.personalized_dirs)} clients)"
    )
    print(f"report:                {result.report_path}")
    from hf_fcmoe.hub.recipe import next_push_command

    print(f"share it on the Hub:   {next_push_command(config)}")
    return 0


def _push(args: argparse.Namespace, overrides: dict) -> int:
    if overrides:
        raise ValueError(f"hf-fcmoe push takes no --key value overrides, got {sorted(overrides)}")
    from hf_fcmoe.hub.publisher import push_run

    def confirm(plan, endpoint: str) -> bool:
        print(plan.describe(endpoint))
        if args.yes:
            return True
        if not sys.stdin or not sys.stdin.isatty():
            raise ValueError("confirmation needed and stdin is not a terminal: pass --yes to push this plan")
        return input("push this? [y/N] ").strip().lower() in ("y", "yes")

    rounds = int(args.rounds) if args.rounds.isdigit() else args.rounds
    from hf_fcmoe.hub.plan import find_node_run

    if find_node_run(args.run_dir) is not None:  # a Flower node's state-dir: its own personalized adapter only
        report = _push_node(args, confirm)
        print("nothing pushed" if report is None else report.summary())
        return 0
    report = push_run(
        args.run_dir,
        args.repo_id,
        clients=args.clients,
        personalized_repo_id=args.personalized_repo_id,
        rounds=rounds,
        base_repo_id=args.base_repo_id,
        private=args.private,
        token=args.token,
        endpoint=args.endpoint,
        confirm=confirm,
    )
    print("nothing pushed" if report is None else report.summary())
    return 0


def _push_node(args: argparse.Namespace, confirm):
    from hf_fcmoe.hub.publisher import push_node_run

    server_only = {
        "--clients": args.clients != "none",
        "--personalized_repo_id": args.personalized_repo_id,
        "--rounds": args.rounds != "final",
    }
    given = [name for name, value in server_only.items() if value]
    if given:
        raise ValueError(f"{' '.join(given)}: for a server run directory; a node pushes only its own adapter")
    return push_node_run(
        args.run_dir,
        args.repo_id,
        global_repo_id=args.global_repo_id,
        base_repo_id=args.base_repo_id,
        private=args.private,
        token=args.token,
        endpoint=args.endpoint,
        confirm=confirm,
    )


def _partition(args: argparse.Namespace, overrides: dict) -> int:
    from hf_fcmoe.config import load_config
    from hf_fcmoe.data.partition_report import run_partition

    config = load_config(args.config, overrides)
    print(run_partition(config.data_spec(), config.output_dir))
    return 0


def _bench(args: argparse.Namespace, overrides: dict) -> int:
    from hf_fcmoe.bench import load_bench_config, run_bench

    bench = load_bench_config(args.config, overrides)
    command = " ".join(["hf-fcmoe bench --config", args.config, *args.raw_overrides])
    print(f"report: {run_bench(bench, command=command)}")
    return 0


def _pretrain(args: argparse.Namespace, overrides: dict) -> int:
    from hf_fcmoe.bench import load_bench_config
    from hf_fcmoe.bench.runner import prepare_base

    bench = load_bench_config(args.config, overrides)
    if bench.pretrain is None:
        raise ValueError(f"{args.config} has no 'pretrain' section")
    print(f"base model: {prepare_base(bench)}")
    return 0


def _upcycle(args: argparse.Namespace, overrides: dict) -> int:
    import json

    from hf_fcmoe.config import load_yaml_dataclass
    from hf_fcmoe.models.upcycle import UpcycleConfig, upcycle

    report = upcycle(load_yaml_dataclass(UpcycleConfig, args.config, overrides))
    summary = {
        key: report[key] for key in ("max_abs_logit_diff", "perplexity", "seconds", "peak_rss_gb") if key in report
    }
    print(json.dumps(summary, indent=2))
    print(f"upcycled model: {report['options']['output_dir']}")
    return 0


def _run_fields_help() -> str:
    from trl import SFTConfig

    from hf_fcmoe.config import FederatedMoEConfig
    from hf_fcmoe.config_fields import fields_help

    title = "local training (TrainingArguments / SFTConfig fields: each client's local round)"
    return fields_help(FederatedMoEConfig, inherited_from=SFTConfig, inherited_title=title)


def _bench_fields_help() -> str:
    from hf_fcmoe.bench.config import BenchConfig
    from hf_fcmoe.config_fields import fields_help

    runs = "--run.<field> sets one FederatedMoEConfig field of every run (see simulate --help)."
    return f"{fields_help(BenchConfig)}\n\n{runs}"


def _upcycle_fields_help() -> str:
    from hf_fcmoe.config_fields import fields_help
    from hf_fcmoe.models.upcycle import UpcycleConfig

    return fields_help(UpcycleConfig)


class _FieldsHelpAction(argparse.Action):
    """`-h/--help` of a sub-command: its own options, then every config field (imported only when asked)."""

    def __init__(self, option_strings, dest, fields_text=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.fields_text = fields_text

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print("\nEvery field below is a recipe key and a --key value option (the command line wins):\n")
        print(self.fields_text())
        parser.exit()


def _sub(sub, name: str, help: str, fields_text=None) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help, add_help=fields_text is None)
    if fields_text is not None:
        parser.add_argument("-h", "--help", action=_FieldsHelpAction, fields_text=fields_text, help="show every field")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fcmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    simulate = _sub(sub, "simulate", "run a federated fine-tuning in this process", _run_fields_help)
    simulate.add_argument("--config", required=True, help="recipe YAML (FederatedMoEConfig fields)")
    simulate.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    simulate.add_argument(
        "--accelerate_config",
        default=None,
        help="check the settings here, then run under `accelerate launch --config_file FILE` (several processes)",
    )
    simulate.set_defaults(handler=_simulate)
    partition = _sub(sub, "partition", "print per-client label counts and save a stacked-bar plot", _run_fields_help)
    partition.add_argument("--config", required=True, help="recipe YAML (its data fields are used)")
    partition.set_defaults(handler=_partition)
    bench = _sub(
        sub, "bench", "run a benchmark grid (methods x alphas x seeds) and write report.md", _bench_fields_help
    )
    bench.add_argument("--config", required=True, help="bench YAML (BenchConfig fields; --run.<field> reaches runs)")
    bench.set_defaults(handler=_bench)
    pretrain = _sub(sub, "pretrain", "pretrain (or reuse) the tiny MoE base of a bench YAML", _bench_fields_help)
    pretrain.add_argument("--config", required=True, help="bench YAML with a 'pretrain' section")
    pretrain.set_defaults(handler=_pretrain)
    upcycle = _sub(
        sub,
        "upcycle",
        "turn a dense Llama (default: SmolLM2 GGUF) into an MoE folder (--key value: UpcycleConfig)",
        _upcycle_fields_help,
    )
    upcycle.add_argument("--config", default=None, help="optional YAML of UpcycleConfig fields")
    upcycle.set_defaults(handler=_upcycle)
    push = sub.add_parser("push", help="publish a run's global (and named personalized) adapters to the Hub")
    push.add_argument(
        "run_dir", help="the run directory (output_dir of a run), or a Flower node's state-dir (its own adapter)"
    )
    push.add_argument(
        "--repo_id", required=True, help="Hub repo ORG/NAME of the global adapter (of a node: its own adapter)"
    )
    push.add_argument(
        "--global_repo_id", default=None, help="a node's push: the federation's global adapter its card names"
    )
    push.add_argument("--private", action="store_true", help="create the repos private")
    push.add_argument("--clients", default="none", help="personalized adapters to push: all, none, or ID,ID,...")
    push.add_argument(
        "--personalized_repo_id", default=None, help="one repo per client, e.g. ORG/NAME-{client_id} (else branches)"
    )
    push.add_argument("--rounds", default="final", help="final (the finished global) or all (every round, tagged)")
    push.add_argument("--base_repo_id", default=None, help="repo for a base model not on the Hub (default REPO-base)")
    push.add_argument("--yes", action="store_true", help="push without asking for confirmation")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    push.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    push.set_defaults(handler=_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.raw_overrides = rest
    try:
        return args.handler(args, parse_overrides(rest))
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as error:
        if _launched_rank() == 0:  # under accelerate launch every process fails the same way: say it once
            print(f"hf-fcmoe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
