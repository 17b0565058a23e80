"""GGUF files of our models for llama.cpp and what runs on it (Ollama, LM Studio, llama-cpp-python).

Written with the `gguf` package (llama.cpp's own writer and quantizers, gguf-py), following what
llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel` and `TextModel` in its conversion/
package) writes for a Hugging Face Llama folder:

- architecture `llama` and its hyperparameters (block count, widths, heads, RMSNorm eps, RoPE base
  and dimension count, key/value length, vocabulary size, context length);
- the tensors under llama.cpp's names (gguf.get_tensor_name_map), with the rows of q_proj and k_proj
  permuted as `LlamaModel.permute` does: our weights rotate RoPE in Hugging Face's half-split layout,
  llama.cpp's `llama` graph rotates adjacent pairs;
- no `output.weight` when the embeddings are tied (llama.cpp then reads the head from token_embd);
- Llama-3 RoPE scaling as the `rope_freqs.weight` tensor of per-frequency divisors
  (`LlamaModel.generate_extra_tensors`), taken here from our own rope_frequencies;
- tensor types as the converter picks them: 1-D tensors and norms F32, matrices in the file type;
- the byte-level BPE as tokenizer.ggml.model `gpt2` (`_set_vocab_gpt2`): tokens in the byte alphabet,
  merges, special tokens as CONTROL, ids past the tokenizer's end as `[PAD<i>]` UNUSED.

Two choices the converter does not make for us:

- tokenizer.ggml.pre. The converter picks it by hashing a test string's ids, and knows Llama-3's as
  `llama-bpe`. llama.cpp's `llama-bpe` splits with Llama-3's pattern and sets ignore_merges (a piece
  that is a whole vocabulary entry is one token, as tiktoken does). A BPE we train with tokenizers
  splits with the same pattern but applies its merges to every piece, so it gets `smaug-bpe`: the
  same pattern in llama.cpp (src/llama-vocab.cpp), without ignore_merges. Which one a tokenizer needs
  is read from its tokenizer.json (`model.ignore_merges`). On the BPEs trained on the handbook every
  vocabulary entry encodes to itself, so the two rules give the same ids there; smaug-bpe is the one
  that states ours.
- q4_0. The converter writes no Q4_0; llama-quantize does, and keeps the output projection (the
  embedding when tied) at Q6_K. gguf-py has no Q6_K quantizer, so that tensor is Q8_0 here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import gguf
import torch

from zagreus.checkpoint import load_model_and_tokenizer
from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.hf import hf_state_dict
from zagreus.model.llama import Transformer, rope_frequencies
from zagreus.post.chat import saved_chat_template, stop_token_ids, template_of
from zagreus.release.card import LICENSE, LISTING, languages, run_recipe
from zagreus.release.export import default_export_dir
from zagreus.rundir import RunDir, is_export, locate
from zagreus.tokenizer import LLAMA3_PATTERN, Tokenizer

QUANTS = ("f16", "q8_0", "q4_0")


def _types(quant: str):
    """(file type, matrix type, output-projection type) of a --quant."""
    Q = gguf.GGMLQuantizationType
    return {
        "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16, Q.F16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0),
        "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, Q.Q8_0),  # llama-quantize: Q6_K (see the docstring)
    }[quant]


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj / k_proj rows from the half-split RoPE layout to llama.cpp's adjacent pairs
    (convert_hf_to_gguf.py, LlamaModel.permute; k_proj passes the KV head count)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs: what each unscaled inverse frequency is divided by under Llama-3 scaling."""
    return rope_frequencies(cfg.model_copy(update={"rope_scaling": None})) / rope_frequencies(cfg)


def pre_tokenizer_type(spec: dict, name: str) -> str:
    """tokenizer.ggml.pre for the tokenizer.json `spec` of our tokenizer `name` (see the module docstring)."""
    pre = spec.get("pre_tokenizer") or {}
    pattern = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if spec.get("normalizer") is not None or pattern != [LLAMA3_PATTERN]:
        raise UserError(f"tokenizer {name} does not split text with Llama-3's pattern, and llama.cpp has no "
                        f"pre-tokenizer to match it; GGUF export takes the Llama-3 tokenizer or one made by "
                        f"`zagreus tokenizer train`")
    return "llama-bpe" if spec["model"].get("ignore_merges") else "smaug-bpe"


def _add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int, chat_template: str | None) -> None:
    hf = tokenizer.to_hf()
    spec = json.loads(hf.to_str())
    by_id = {i: t for t, i in hf.get_vocab(with_added_tokens=True).items()}
    specials = set(tokenizer.special_tokens.values())
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_type(spec, tokenizer.name))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes a merge as a pair (newer) or as "a b" (older); GGUF stores "a b".
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    # The pad token Tokenizer.save names in tokenizer_config.json.
    pad = next((tokenizer.special_tokens[t] for t in ("<|finetune_right_pad_id|>", "<|pad|>") if t in tokenizer.special_tokens), None)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(True)  # our documents start with BOS, as Meta's Llama-3 files say
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: Path, quant: str = "f16", name: str = "zagreus",
               chat_template: str | None = None, template: str | None = None,
               language_codes: list[str] | None = None) -> Path:
    """Write `model` with `tokenizer` as the GGUF `path` in `quant` (f16, q8_0 or q4_0); returns `path`.

    `template` ("chatml" or "llama3", with `chat_template` its Jinja text) names the end-of-turn token.
    """
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    file_type, matrix_type, output_type = _types(quant)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # its INFO lines per file tell a user nothing
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])

    # General metadata, as the converter's prepare_metadata writes it.
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(cfg.param_counts()["total"], 0, 0, 0))
    writer.add_license(LICENSE)
    if language_codes:
        writer.add_languages(language_codes)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # TextModel.set_gguf_parameters and LlamaModel.set_gguf_parameters.
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)

    _add_tokenizer(writer, tokenizer, cfg.vocab_size, chat_template)
    if template is not None:
        # The template's end-of-turn token (first of its stop ids): llama.cpp guesses it from token
        # texts otherwise, and both <|eot_id|> and <|im_end|> are in our Llama-3 vocabulary.
        writer.add_eot_token_id(stop_token_ids(tokenizer, template)[0])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    tensors = hf_state_dict(model)  # a tied head is stored once, as token_embd
    if cfg.rope_scaling is not None:
        writer.add_tensor("rope_freqs.weight", rope_freq_factors(cfg).float().numpy())
    for hf_name, tensor in tensors.items():
        tensor = tensor.float()
        if hf_name.endswith("q_proj.weight"):
            tensor = permute_rope_rows(tensor, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute_rope_rows(tensor, cfg.n_kv_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        data = tensor.numpy()
        if data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32
        elif gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and cfg.tie_embeddings):
            qtype = output_type
        else:
            qtype = matrix_type
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row not a whole number of blocks: F16, as the converter falls back
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_file_name(name: str, model: Transformer, quant: str) -> str:
    """The GGUF naming convention (ggml's docs/gguf.md, gguf.naming_convention): name-size-QUANT.gguf."""
    size = gguf.size_label(model.cfg.param_counts()["total"], 0, 0, 0)
    return gguf.naming_convention(name, None, None, None, size, quant.upper()) + ".gguf"


def model_name(run: RunDir | None, model_path: Path) -> str:
    """general.name: the recipe's name, else the run directory's or the model folder's name."""
    return str(run_recipe(run).get("name") or (run.root if run is not None else Path(model_path).resolve()).name)


def export_gguf(source: Path, out: Path | None = None, quant: str = "f16") -> Path:
    """`source` (checkpoint, run directory or export folder) as a GGUF file `out`; returns its path.

    `out` defaults to a file in the export folder itself for an export, else in RUN_DIR/exports/step-N/.
    """
    source = Path(source)
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    run = locate(source).run
    model, tokenizer = load_model_and_tokenizer(source)
    name = model_name(run, source)
    if out is None:
        out = (source if is_export(source) else default_export_dir(source)) / gguf_file_name(name, model, quant)
    chat = saved_chat_template(source)
    return write_gguf(model, tokenizer, out, quant, name=name, chat_template=chat,
                      template=template_of(source, None) if chat else None, language_codes=languages(run_recipe(run)))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_release_ggufs(folder: Path, quants: list[str], run: RunDir | None) -> list[dict]:
    """The model of the release folder `folder` (an export made by `run`, or None) as one GGUF per
    quant beside it, listed in LISTING with their sizes and sha256."""
    model, tokenizer = load_model_and_tokenizer(folder)
    name = model_name(run, folder)
    chat = saved_chat_template(folder)
    entries = []
    for quant in quants:
        path = write_gguf(model, tokenizer, folder / gguf_file_name(name, model, quant), quant, name=name,
                          chat_template=chat, template=template_of(folder, None) if chat else None,
                          language_codes=languages(run_recipe(run)))
        entries.append({"file": path.name, "quant": quant, "bytes": path.stat().st_size, "sha256": sha256_of(path)})
    (folder / LISTING).write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return entries

