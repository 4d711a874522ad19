"""Aggregation: pure merging math plus the hub that validates updates and dispatches methods."""

from hf_fcmoe.aggregation.hub import METHODS, AggregationHub
from hf_fcmoe.aggregation.types import AggregationResult, ClientUpdate
from hf_fcmoe.aggregation.validation import UpdateRejected, check_client_id, update_fingerprint

__all__ = [
    "METHODS",
    "AggregationHub",
    "AggregationResult",
    "ClientUpdate",
    "UpdateRejected",
    "check_client_id",
    "update_fingerprint",
]
