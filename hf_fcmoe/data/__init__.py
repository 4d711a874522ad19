"""Data: sources, non-IID partitioners and per-client splits."""

from hf_fcmoe.data.federated import DataSpec, FederatedData, load_federated_data
from hf_fcmoe.data.partition import partition_indices

__all__ = ["DataSpec", "FederatedData", "load_federated_data", "partition_indices"]
