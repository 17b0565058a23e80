"""Model shapes: the config, the named presets, parameter counts and training FLOPs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from zagreus.errors import UserError


class RopeScaling(BaseModel):
    """Llama-3 frequency scaling of RoPE (as in Llama-3.1/3.2 long-context models)."""

    model_config = ConfigDict(extra="forbid")
    factor: float = Field(32.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)

    @model_validator(mode="after")
    def _band(self) -> "RopeScaling":
        # rope_frequencies divides by their difference.
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor {self.high_freq_factor} must exceed low_freq_factor {self.low_freq_factor}")
        return self


class ModelConfig(BaseModel):
    """Shape of a Llama-3.2-style dense decoder."""

    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(128256, ge=1)
    hidden_size: int = Field(960, ge=1)
    n_layers: int = Field(32, ge=1)
    n_heads: int = Field(15, ge=1)
    n_kv_heads: int = Field(5, ge=1)
    intermediate_size: int = Field(2560, ge=1)
    max_seq_len: int = Field(4096, ge=2)  # a training sequence needs one token and the next
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.03227, gt=0)  # init_method.std of that Nanotron config (not in the report's text)
    bos_token_id: int = Field(128000, ge=0)
    eos_token_id: int = Field(128001, ge=0)

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:  # RoPE rotates pairs of a head's channels
            raise ValueError(f"hidden_size / n_heads = {self.head_dim} must be even")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts; a tied output matrix is counted once, as part of the embedding."""
        d, kv = self.hidden_size, self.n_kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2
        mlp = 3 * d * self.intermediate_size
        per_layer = attention + mlp + 2 * d
        embedding = self.vocab_size * d
        output = 0 if self.tie_embeddings else self.vocab_size * d
        non_embedding = self.n_layers * per_layer + d + output
        return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding}

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM-style.

        6 x (every weight used in a matmul, the output projection included, the embedding lookup
        not) + 12 x layers x attention width x sequence length for the attention scores.
        """
        seq = seq_len or self.max_seq_len
        counts = self.param_counts()
        matmul_params = counts["non_embedding"] - (self.n_layers * 2 + 1) * self.hidden_size
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.hidden_size
        return 6 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq


PRESETS: dict[str, ModelConfig] = {
    # Zagreus-0.4B: the shape of the Nanotron pretraining config in the authors' repository README
    # (github.com/mii-llm/zagreus-nesso-slm); the report's text gives no shape, only "~500 million
    # parameters". 437,760,960 parameters as counted by param_counts().
    "zagreus-0.4b": ModelConfig(),
    "llama-3.2-1b": ModelConfig(
        hidden_size=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
        max_seq_len=131072, rope_theta=500000.0, rope_scaling=RopeScaling(), init_std=0.02,
    ),
    # Small shapes for CPU work; the tokenizer decides the vocabulary in recipes.
    "tiny": ModelConfig(
        vocab_size=8192, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2,
        intermediate_size=384, max_seq_len=512, init_std=0.02,
    ),
    "small": ModelConfig(
        vocab_size=128256, hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=2,
        intermediate_size=768, max_seq_len=1024, init_std=0.02,
    ),
}


def resolve_model_config(preset: str | None = None, **overrides) -> ModelConfig:
    """A preset by name with field overrides, or a config from overrides alone."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown model preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset].model_dump() if preset else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**base)
