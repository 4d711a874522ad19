"""Write a recipe's client partitions as one folder per client (train.jsonl, eval.jsonl) for SuperNodes.

`python -m hf_fcmoe.federation.flower.export_data --config RECIPE --out DIR` prints each node's
`--node-config`. In a real federation every organisation already has its own files; this builds the
demo's and the tests' nodes from the same partition the in-process engine draws, so both engines see
the same rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_fcmoe.config import FederatedMoEConfig, load_config
from hf_fcmoe.data.federated import load_federated_data


def export_client_data(config: FederatedMoEConfig, out_dir: str | Path) -> dict[str, Path]:
    """Each client's train/eval rows (in training format) under out_dir/<client_id>/; returns the folders."""
    data = load_federated_data(config.data_spec())
    folders = {}
    for cid in data.client_ids:
        folder = Path(out_dir) / cid
        folder.mkdir(parents=True, exist_ok=True)
        data.train[cid].to_json(str(folder / "train.jsonl"), lines=True)
        data.eval[cid].to_json(str(folder / "eval.jsonl"), lines=True)
        folders[cid] = folder
    return folders


def node_config(client_id: str, folder: Path, state_dir: Path) -> str:
    """The `--node-config` string of one SuperNode (Flower's key=value syntax, TOML values)."""
    return (
        f"client-id='{client_id}' train-data='{folder / 'train.jsonl'}' eval-data='{folder / 'eval.jsonl'}' "
        f"state-dir='{state_dir}'"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--out", required=True, help="folder for <client_id>/train.jsonl + eval.jsonl")
    parser.add_argument("--state-root", default=None, help="parent of each node's state-dir (default: OUT/state)")
    args = parser.parse_args()
    folders = export_client_data(load_config(args.config), args.out)
    state_root = Path(args.state_root or Path(args.out) / "state")
    for cid, folder in folders.items():
        print(f'{cid}: --node-config "{node_config(cid, folder.resolve(), (state_root / cid).resolve())}"')


if __name__ == "__main__":
    main()
