"""The pretraining loop (single device; seams for the parallelism helper), see run_pretrain."""

from __future__ import annotations

import torch

from zagreus.model.config import ModelConfig
from zagreus.model.llama import Transformer, rope_frequencies


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> Transformer:
    """Create the model on the meta device (no memory, no init work), then materialise and initialise it.

    Parallel wrappers can shard the meta model before materialising; here it is materialised
    at once. seed None leaves the weights uninitialised (a checkpoint will overwrite them).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module its own parameter; tie them again
        model.lm_head.weight = model.embed_tokens.weight
    with torch.no_grad():
        model.inv_freq.copy_(rope_frequencies(cfg))  # a non-persistent buffer: no checkpoint restores it
    if seed is not None:
        model.init_weights(seed)
    return model

