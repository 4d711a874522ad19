"""Data: sources, training formats, non-IID partitioners, per-client splits and partition reports."""

from hf_fcmoe.data.federated import DataSpec, FederatedData, load_federated_data
from hf_fcmoe.data.formatting import to_training_format
from hf_fcmoe.data.partition import PARTITIONERS, partition_indices
from hf_fcmoe.data.partition_report import describe_partition, plot_partition, run_partition
from hf_fcmoe.data.sources import BUNDLED, load_source

__all__ = [
    "BUNDLED",
    "PARTITIONERS",
    "DataSpec",
    "FederatedData",
    "describe_partition",
    "load_federated_data",
    "load_source",
    "partition_indices",
    "plot_partition",
    "run_partition",
    "to_training_format",
]
