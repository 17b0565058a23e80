"""The Llama-3.2-style dense decoder in plain PyTorch, with a KV cache for generation.

Module names follow Hugging Face's LlamaForCausalLM (minus the `model.` prefix), so the
export is a rename-free copy. Layers live in a ModuleDict keyed by their index and the
embedding, final norm and output head may be None: pipeline parallelism cuts a model into
stages by deleting modules, as torchtitan does, and forward() passes hidden states through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zagreus.model.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, with Llama-3 scaling of the low frequencies when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_freq_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, T, head_dim] for integer positions [B, T]."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by the half-split convention used by Hugging Face Llama."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the autocast dtype, as Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer for a batch, filled up to `length` positions."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        # -1 instead of the head count lets tensor parallelism shard heads without changes here.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        is_causal = mask is None
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k = cache.keys[layer][:, :, : start + T]
            v = cache.values[layer][:, :, : start + T]
            if mask is None and start > 0:
                # New queries see the whole cache plus the causal part of themselves.
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and T > 1, enable_gqa=q.shape[1] != k.shape[1]
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only Llama. forward() returns logits, or final hidden states when asked."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # On the meta device, no init: Embedding's N(0, 1) and RoPE's arithmetic compute nothing there, yet
        # their first call imports torch's meta kernels (1.2 s) that building and loading never need.
        on_meta = torch.get_default_device().type == "meta"
        empty = torch.empty(cfg.vocab_size, cfg.hidden_size) if on_meta else None
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=empty)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = torch.empty(cfg.head_dim // 2) if on_meta else rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Every matrix N(0, init_std), norms at one.

        The Zagreus preset's 0.03227 is init_method.std of the Nanotron config in the authors'
        repository README (the report's text states no init). Unlike Nanotron's standard init, the
        output projections (o_proj, down_proj) are not scaled down by sqrt(2 x layers).

        Works on any distributed form of the model (a pipeline stage, TP/FSDP DTensors, AC
        wrappers) and gives every layout the single-process weights: the matrices are drawn in
        the whole model's module order from one generator, one full matrix at a time, and each
        rank keeps its own shard of the matrices it holds.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        here = {name.replace("._checkpoint_wrapped_module", ""): module for name, module in self.named_modules()}
        with torch.device("meta"):
            whole = Transformer(self.cfg)  # the module order and shapes; no memory
        for name, module in whole.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                full = torch.empty(module.weight.shape).normal_(0.0, self.cfg.init_std, generator=gen)
                if name in here:
                    _write_shard(here[name].weight, full)
            elif isinstance(module, RMSNorm) and name in here:
                here[name].weight.fill_(1.0)
        self.inv_freq.copy_(rope_frequencies(self.cfg))

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens: [B, T] ids (or [B, T, D] hidden states on a later pipeline stage).

        positions: [B, T] RoPE positions (default 0..T-1 after the cache); mask: boolean
        [B, 1, T, S] where True means "may attend" (default causal), used for packed documents.
        """
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        B, T = h.shape[:2]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=h.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        if self.norm is not None:
            h = self.norm(h)
        if return_hidden or self.lm_head is None:
            return h
        return self.lm_head(h)


def _write_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy `full` into `param`, or only this rank's part of it when `param` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds `full`, so each takes its shard without communication.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model on the meta device: shapes only, no memory, no init work. Parallelise it, then
    `materialize` it, so that each rank only ever allocates its own shard."""
    with torch.device("meta"):
        return Transformer(cfg)


def materialize(model: Transformer, device: str | torch.device, seed: int | None = 0) -> Transformer:
    """Allocate a meta-device model (whole, or in any distributed form) on `device` and initialise it.

    seed None leaves the weights uninitialised (a checkpoint or a weights file will overwrite them).
    """
    # Swapping parameters in place keeps shared ones shared (tied embeddings) and keeps the
    # parameter objects that FSDP2 and the optimizer refer to.
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with torch.no_grad():
        model.inv_freq.copy_(rope_frequencies(model.cfg))  # a non-persistent buffer: no checkpoint restores it
    if seed is not None:
        model.init_weights(seed)
    return model


def holding(model: Transformer, state: dict[str, torch.Tensor], device: str | torch.device) -> Transformer:
    """A meta-device model made of `state`'s own tensors (assigned, not copied into new memory),
    on `device`. For loading weights: no allocation and no fill beforehand (`to_empty` with swapped
    parameters also imports torch's symbolic-shape machinery, 0.5 s per process)."""
    model.load_state_dict(state, assign=True)
    if model.cfg.tie_embeddings:  # assign gave the head a parameter object of its own
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(model.cfg)
    return model.to(device)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> Transformer:
    """The whole model on `device`, built on the meta device first; seed None: uninitialised."""
    return materialize(meta_model(cfg), device, seed)
