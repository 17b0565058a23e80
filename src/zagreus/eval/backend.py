"""Which scorer evaluates a model: zagreus' fast one, or lm-eval's own HFLM for any other causal LM.

Decided from what is on disk, never by trying our loader and falling back: a checkpoint or a
run directory is ours; an export folder is ours when its config.json is one zagreus wrote
(`zagreus_version`) or a Llama folder our loader reads (LlamaForCausalLM, safetensors weights,
tokenizer.json, default or llama3 RoPE, no biases); any other folder with a config.json (Qwen2,
LFM2, Gemma, ...) and any hub id ("Qwen/Qwen3-0.6B") goes to HFLM.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from zagreus.errors import UserError, read_json
from zagreus.rundir import is_export, locate

Backend = Literal["zagreus", "hf"]
# A Hugging Face hub repo id: "name" or "owner/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def local_path(model: str | Path) -> Path:
    return Path(os.path.expanduser(str(model)))


def backend_of(model: str | Path) -> Backend:
    """'zagreus' for what zagreus' loader opens, 'hf' for any other Hugging Face causal LM (folder or hub id)."""
    path = local_path(model)
    if not path.exists():
        if HUB_ID.match(str(model)):  # typer hands it over as a Path: "Qwen/Qwen3-0.6B" reads as one
            return "hf"
        raise UserError(f"{model}: no such file or folder, and not a hub id (owner/name); pass an export folder, "
                        f"a checkpoint, a run directory or a Hugging Face model")
    if not is_export(path):
        locate(path)  # a UserError when it is neither a checkpoint nor a run directory
        return "zagreus"
    config = read_json(path / "config.json", fix="copy the model folder again from where it came from")
    return "zagreus" if zagreus_loads(config, path) else "hf"


def zagreus_loads(config: dict, folder: Path) -> bool:
    """Whether `zagreus.model.hf.load_hf` and our tokenizer read this export folder as the model it is."""
    if config.get("model_type") != "llama":
        return False
    if (config.get("architectures") or ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        return False
    if "zagreus_version" in config:
        return True  # ours: a damaged one gets our loader's message, not another library's
    scaling, params = config.get("rope_scaling") or {}, config.get("rope_parameters") or {}
    if not isinstance(scaling, dict) or not isinstance(params, dict):
        return False
    rope_ok = ((not scaling or scaling.get("rope_type", scaling.get("type")) == "llama3")
               and params.get("rope_type", "default") in ("default", "llama3"))
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    head_dim_ok = "head_dim" not in config or (heads and hidden and config["head_dim"] * heads == hidden)
    return bool(rope_ok and head_dim_ok
            and not config.get("attention_bias") and not config.get("mlp_bias")
            and config.get("hidden_act", "silu") == "silu"
            and any(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file())
