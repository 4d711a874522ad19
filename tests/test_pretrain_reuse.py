"""A pretrained tiny base is reused wherever its folder now lives, and retrained when what it describes changes."""

from __future__ import annotations

import shutil

import pytest

from hf_fcmoe.models import pretrain
from hf_fcmoe.models.pretrain import PretrainConfig, pretrain_base

TINY = dict(
    hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_experts=4, top_k=2,
    corpora=["synthetic_domains:addition,reverse"], examples_per_corpus=40, probe_domains=None, max_length=32,
    max_steps=2, per_device_train_batch_size=4,
)  # fmt: skip


def test_a_copied_base_is_reused_and_a_changed_one_is_retrained(tmp_path, monkeypatch):
    first = pretrain_base(PretrainConfig(output_dir=str(tmp_path / "a"), **TINY))
    shutil.copytree(first, tmp_path / "b")

    class Retrained(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(pretrain, "build_byte_tokenizer", refuse)  # the first step of a training run
    assert pretrain_base(PretrainConfig(output_dir=str(tmp_path / "b"), **TINY)) == tmp_path / "b"
    with pytest.raises(Retrained):
        pretrain_base(PretrainConfig(output_dir=str(tmp_path / "b"), **{**TINY, "max_steps": 3}))
