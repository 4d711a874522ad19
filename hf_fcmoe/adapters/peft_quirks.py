"""Narrow filters for warnings PEFT raises from its own code, which no setting of ours can avoid."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def muted_checkpointing_probe() -> Iterator[None]:
    """PEFT 0.21 reads the deprecated `model.is_gradient_checkpointing` property whenever it wraps or loads a
    model, and transformers 5.x warns on every read: mute exactly that FutureWarning, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
