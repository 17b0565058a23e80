"""The Hugging Face folder format: export our model (config.json, model.safetensors, tokenizer
files, generation_config.json) so transformers loads it with no custom code, and import back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zagreus import __version__
from zagreus.errors import UserError, read_json
from zagreus.model.config import ModelConfig, RopeScaling
from zagreus.model.llama import Transformer, holding, meta_model


def to_llama_config(cfg: ModelConfig) -> dict:
    """config.json in the LlamaConfig layout (legacy rope keys, which every transformers reads)."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **cfg.rope_scaling.model_dump()}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


# config.json's key (LlamaConfig's name) of each ModelConfig field, for messages about a damaged file.
HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
           "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta", "rope_scaling": "rope_scaling",
           "tie_embeddings": "tie_word_embeddings", "norm_eps": "rms_norm_eps", "init_std": "initializer_range",
           "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
# LlamaConfig's defaults do not fit a model of ours, so these keys must be there.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
DAMAGED = "copy the folder again from where it came from, or export it again with `zagreus export`"


def from_llama_config(raw: dict, source: Path) -> ModelConfig:
    """Our config from a LlamaConfig dict; a key that is missing, mistyped or out of bounds is a UserError naming it."""
    if raw.get("model_type") != "llama":
        raise UserError(f"{source}: model_type is {raw.get('model_type')!r}; only Llama-architecture folders can be imported")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise UserError(f"{source}: no key '{missing[0]}'; {DAMAGED}")
    rope, rope_params = raw.get("rope_scaling") or None, raw.get("rope_parameters") or {}
    for key, value in (("rope_scaling", rope or {}), ("rope_parameters", rope_params)):
        if not isinstance(value, dict):
            raise UserError(f"{source}: key '{key}' is {value!r}, not an object; {DAMAGED}")
    if rope is None and rope_params.get("rope_type") == "llama3":
        rope = rope_params
    if rope is not None and rope.get("rope_type", rope.get("type")) != "llama3":
        raise UserError(f"{source}: rope_scaling type {rope.get('rope_type')!r} is not supported (only llama3)")
    eos = raw.get("eos_token_id", 128001)
    fields = {
        "vocab_size": raw["vocab_size"], "hidden_size": raw["hidden_size"], "n_layers": raw["num_hidden_layers"],
        "n_heads": raw["num_attention_heads"], "n_kv_heads": raw.get("num_key_value_heads", raw["num_attention_heads"]),
        "intermediate_size": raw["intermediate_size"], "max_seq_len": raw.get("max_position_embeddings", 4096),
        "rope_theta": raw.get("rope_theta", rope_params.get("rope_theta", 10000.0)),
        "rope_scaling": None if rope is None else {k: rope[k] for k in RopeScaling.model_fields if k in rope},
        "tie_embeddings": raw.get("tie_word_embeddings", False), "norm_eps": raw.get("rms_norm_eps", 1e-5),
        "init_std": raw.get("initializer_range", 0.02), "bos_token_id": raw.get("bos_token_id", 128000),
        "eos_token_id": eos[0] if isinstance(eos, list) and eos else eos,
    }
    try:
        cfg = ModelConfig(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["loc"]:
            key = ".".join([HF_KEYS[err["loc"][0]], *map(str, err["loc"][1:])])
            problem = f"key '{key}': {err['msg'].removeprefix('Value error, ')} (got {err['input']!r})"
        else:  # a check across fields, such as heads that do not divide the width
            problem = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{source}: {problem}; {DAMAGED}") from None
    head_dim = raw.get("head_dim", cfg.head_dim)
    if head_dim != cfg.head_dim:
        raise UserError(f"{source}: head_dim {head_dim!r} x num_attention_heads {cfg.n_heads} != hidden_size "
                        f"{cfg.hidden_size}, which is not supported")
    return cfg


def hf_names(model: Transformer) -> dict[str, torch.Tensor]:
    """Our tensors, not copied, under LlamaForCausalLM's names (Hugging Face's `model.` prefix);
    a tied head appears under both names, as in LlamaForCausalLM's own state dict."""
    return {name if name == "lm_head.weight" else f"model.{name}": tensor.detach()
            for name, tensor in model.state_dict().items()}


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """hf_names on the CPU, for a file: a tied head is stored once."""
    out = hf_names(model)
    if model.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


def save_hf(model: Transformer, tokenizer, out_dir: Path, chat_template: str | None = None,
            dtype: torch.dtype = torch.float32) -> Path:
    """Write the export folder; the tokenizer's special ids must match the model's config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    # The tokenizer is the truth for special ids: presets default to Llama-3's.
    cfg = cfg.model_copy(update={"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
    config = to_llama_config(cfg)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["zagreus_version"] = __version__
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": [cfg.eos_token_id], "do_sample": False}
    if "<|im_end|>" in tokenizer.special_tokens:
        gen["eos_token_id"].append(tokenizer.special_tokens["<|im_end|>"])
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tensors = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
    # One metadata key only: safetensors writes a map's keys in no fixed order.
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); give it the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out_dir / "model.safetensors", 0o666 & ~umask)
    tokenizer.save(out_dir, chat_template=chat_template, model_max_length=cfg.max_seq_len)
    return out_dir


def load_hf(folder: Path, device: str | torch.device = "cpu") -> Transformer:
    """Our model from a Hugging Face Llama folder (ours or any single-file safetensors Llama)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json; pass a folder written by `zagreus export` or a Hugging Face Llama model")
    cfg = from_llama_config(read_json(config_path, fix=DAMAGED), config_path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except SafetensorError as exc:  # a truncated or overwritten file
            raise UserError(f"{f}: not a readable safetensors file ({exc}); {DAMAGED}") from None
    ours = {}
    for name, tensor in state.items():
        ours[name.removeprefix("model.")] = tensor.float()
    if cfg.tie_embeddings and "embed_tokens.weight" in ours:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    model = meta_model(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - ours.keys()), sorted(ours.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{folder}: tensor {name} has shape {list(tensor.shape)} in the weights but "
                            f"{list(expected[name].shape)} by config.json; the two files do not belong together")
    return holding(model, ours, device)
