"""The Flower engine: hf_fcmoe federations across machines on Flower's Message API (flwr 1.42).

One job per module: `codec` (tensors and updates in Flower records, fingerprints), `node` (a SuperNode's
settings, data and on-disk state), `client_app` (the ClientApp's handlers), `local_round` (a node's local
round under `accelerate launch`), `strategy` (messages out, replies in, validation; the math is the
`AggregationHub`), `server_app` (the round loop, resume, and the run directory through
`federation.server_state`), `initial_adapter` (the first global, with or without base weights on the server).
Tools: `export_data` (a recipe's partitions as per-node files), `wire_size` (bytes per round from shapes).
Importing this package needs `pip install hf-fcmoe[flower]`; recipes/flower/README.md has the commands.
"""
