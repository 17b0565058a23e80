"""Layout rules of zagreus.train.parallel that need no processes: degrees, stage split, refusals.

Training under every layout is compared with a single-process run in test_parallel_pretrain.py.
"""

from __future__ import annotations

import pytest

from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.llama import Transformer
from zagreus.train.parallel import ParallelDims, pipeline_microbatches, split_stage, stage_layers


def tiny_config(tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=128,
                       max_seq_len=64, init_std=0.02, tie_embeddings=tie)


def test_pipeline_split_and_tied_embeddings_refused() -> None:
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    model = Transformer(tiny_config(tie=False))
    split_stage(model, 1, 2)
    assert list(model.layers) == ["2", "3"] and model.embed_tokens is None and model.lm_head is not None
    with pytest.raises(UserError, match="tie_embeddings: false"):
        split_stage(Transformer(tiny_config(tie=True)), 0, 2)


def test_dims_resolution_errors() -> None:
    assert ParallelDims.resolve(1, -1, 2, 2, world_size=8) == ParallelDims(1, 2, 2, 2)
    with pytest.raises(UserError, match="do not divide|does not divide"):
        ParallelDims.resolve(1, -1, 3, 1, world_size=8)
    with pytest.raises(UserError, match="dp_shard: -1 to take them all"):
        ParallelDims.resolve(1, 2, 2, 1, world_size=8)
    with pytest.raises(UserError, match="n_kv_heads"):
        ParallelDims(tp=4).check_model(tiny_config(tie=False), seq_len=32)
    with pytest.raises(UserError, match="seq_len"):
        ParallelDims(tp=2).check_model(tiny_config(tie=False), seq_len=33)
    with pytest.raises(UserError, match="pp = 5 is more than"):
        ParallelDims(pp=5).check_model(tiny_config(tie=False), seq_len=32)
    with pytest.raises(UserError, match="activation_checkpointing: false or compile: false"):
        ParallelDims(tp=2).check_features(activation_checkpointing=True, compile=True)
    ParallelDims(dp_shard=2).check_features(activation_checkpointing=True, compile=True)
    assert pipeline_microbatches(0, 2, local_batch=8) == 2
    with pytest.raises(UserError, match="fewer than pp"):
        pipeline_microbatches(1, 2, local_batch=8)
    with pytest.raises(UserError, match="does not divide the 6 sequences"):
        pipeline_microbatches(4, 2, local_batch=6)
