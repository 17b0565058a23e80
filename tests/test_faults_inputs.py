"""Bad input gives one line, not a traceback (issue 15, points 6-8): damaged export folders, recipe
and chat files that are not UTF-8, and recipe numbers that would pass `check` and fail hours later.

Each test reproduces the fault for real (truncated, emptied or edited files; the CLI as a user
runs it) and asserts the one-line message, the exit code and that nothing already written changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zagreus.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = {"messages": [{"role": "user", "content": "Come stai?"}, {"role": "assistant", "content": "Bene, grazie."}]}


def zagreus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zagreus.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's single `error:` line, once exit code 2, an empty stdout and no traceback are checked."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A 1-layer d=32 random model on a 300-token BPE (ChatML specials included), in the HF format."""
    from zagreus.model.config import ModelConfig
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("export")
    tok = train_bpe(["una frase italiana e una English sentence"] * 30, 300, root / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      intermediate_size=64, max_seq_len=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg)
    model.init_weights(0)
    return save_hf(model, tok, root / "model")


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def edit_config(folder: Path, drop: str | None = None, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop(drop, None)
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# damage -> (how, what the one line must contain: the file, then the field or the problem)
DAMAGES = {
    "config truncated": (lambda f: truncate(f / "config.json", 100), ["config.json:", "not valid JSON"]),
    "config empty": (lambda f: truncate(f / "config.json", 0), ["config.json:1:1: not valid JSON"]),
    "config not an object": (lambda f: (f / "config.json").write_text("[1, 2]"), ["config.json", "found an array"]),
    "config not UTF-8": (lambda f: (f / "config.json").write_bytes(b'{"model_type": "ll\xe4ma"}'),
                         ["config.json:1:19: not valid UTF-8"]),
    "config field of a wrong type": (lambda f: edit_config(f, hidden_size="big"),
                                     ["config.json", "key 'hidden_size'", "'big'"]),
    "config field out of bounds": (lambda f: edit_config(f, num_hidden_layers=-1),
                                   ["config.json", "key 'num_hidden_layers'", "greater than or equal to 1"]),
    "config field missing": (lambda f: edit_config(f, drop="num_attention_heads"),
                             ["config.json", "no key 'num_attention_heads'"]),
    "config of another shape": (lambda f: edit_config(f, intermediate_size=96),
                                ["mlp.", "[32, 64] in the weights but [32, 96] by config.json"]),
    "weights truncated": (lambda f: truncate(f / "model.safetensors", 40_000),
                          ["model.safetensors", "not a readable safetensors file"]),
    "weights empty": (lambda f: truncate(f / "model.safetensors", 0), ["model.safetensors", "not a readable"]),
    "tokenizer truncated": (lambda f: truncate(f / "tokenizer.json", 1000),
                            ["tokenizer.json", "not a readable tokenizer file"]),
    "tokenizer config truncated": (lambda f: truncate(f / "tokenizer_config.json", 50),
                                   ["tokenizer_config.json:", "not valid JSON"]),
    "post-training record truncated": (lambda f: (f / "zagreus.json").write_text('{"template": "chat'),
                                       ["zagreus.json:1:", "not valid JSON"]),
}


def damaged(export: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(export, folder)
    DAMAGES[damage][0](folder)
    return folder


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_export_is_one_line(export, tmp_path, damage):
    """What `zagreus chat` and `serve` open a model folder with (eval and export load it the same way)."""
    from zagreus.serve.engine import open_engine

    folder = damaged(export, tmp_path, damage)
    before = snapshot(folder)
    with pytest.raises(UserError) as info:
        open_engine(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder))
    for part in DAMAGES[damage][1]:
        assert part in message, message
    assert snapshot(folder) == before


@pytest.mark.parametrize("damage,verb", [
    pytest.param("config field of a wrong type", ["eval", "{folder}", "--tasks", "zagreus_arc_it"], id="eval"),
    pytest.param("weights truncated", ["export", "{folder}", "--out", "{out}"], id="export"),
    pytest.param("tokenizer truncated", ["serve", "{folder}", "--port", "0"], id="serve"),
    pytest.param("config truncated", ["release", "{folder}", "--out", "{out}"], id="release"),
])
def test_damaged_export_from_the_cli(export, tmp_path, damage, verb):
    """A subprocess per verb: the one line reaches stderr through the CLI, exit code 2, nothing written."""
    folder, out = damaged(export, tmp_path, damage), tmp_path / "copy"
    before = snapshot(folder)
    line = one_error_line(zagreus(*(arg.format(folder=folder, out=out) for arg in verb)))
    assert all(part in line for part in DAMAGES[damage][1]), line
    assert snapshot(folder) == before and not out.exists()


def test_recipe_not_utf8_names_line_and_column(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: x\n# ricetta per l'italiano\npretrain: {steps: 3}  # più passi\n".encode("latin-1"))
    before = recipe.read_bytes()
    line = one_error_line(zagreus("check", str(recipe)))
    assert line == f"error: {recipe}:3:27: not valid UTF-8 (byte 0xf9); save the file as UTF-8"
    assert recipe.read_bytes() == before


def test_chat_file_not_utf8_names_line_and_column(tmp_path):
    from test_post_train import load_examples
    from zagreus.recipe import ChatDataset

    path = tmp_path / "chat.jsonl"
    bad = json.dumps({"messages": [{"role": "user", "content": "Perché?"}, {"role": "assistant", "content": "Così."}]},
                     ensure_ascii=False)
    path.write_bytes((json.dumps(CHAT) + "\n\n" + bad + "\n").encode("latin-1"))
    with pytest.raises(UserError) as info:
        load_examples(ChatDataset(path=str(path)), Path, "sft")
    assert str(info.value) == f"{path}:3:49: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


# Each of these passed `zagreus check` and failed in the stage (issue 15, point 8).
LATE_FAILURES = [
    # trained 30 steps, then ZeroDivisionError in validation, and no final checkpoint
    ("pretrain: {eval_batches: -2}\n", "key 'pretrain.eval_batches': Input should be greater than or equal to 1 (got -2)"),
    # "-4 steps, final loss nan", exit 0, and the stage marked finished
    ("sft: {epochs: -2, datasets: [{hub: a/b}]}\n", "key 'sft.epochs': Input should be greater than or equal to 1"),
    ("sft: {micro_batch: 0, datasets: [{hub: a/b}]}\n", "key 'sft.micro_batch': Input should be greater than or equal to 1"),
    ("data: {sources: [{name: code, stdlib: true}]}\npretrain: {seq_len: 100000}\n",
     "key 'pretrain.seq_len': 100000 exceeds the model's context of 4096 tokens"),
    ("model: {preset: tiny}\nsft: {seq_len: 100000, datasets: [{hub: a/b}]}\n",
     "key 'sft.seq_len': 100000 exceeds the model's context of 512 tokens"),
    ("model: {overrides: {bogus: 1}}\n", "unknown key 'model.overrides.bogus'; allowed keys: vocab_size"),
]


@pytest.mark.parametrize("body,expected", LATE_FAILURES)
def test_check_catches_what_the_stage_would_fail_on(tmp_path, body, expected):
    recipe = tmp_path / "late.yaml"
    recipe.write_text("name: late\n" + body)
    line = one_error_line(zagreus("check", str(recipe)))
    assert line.startswith(f"error: {recipe}: ") and expected in line, line


# The other numeric fields, bounded in the recipe (and the model's config) so that none fails late.
BOUNDS = [
    ("tokenizer: {train: {max_chars: 0}}", "key 'tokenizer.train.max_chars'"),
    ("data: {sources: [{name: c, stdlib: true}], filters: {min_chars: 500, max_chars: 100}}",
     "key 'data.filters': Value error, min_chars (500) exceeds max_chars (100)"),
    ("data: {sources: [{name: c, stdlib: true}], filters: {language_threshold: 1.5}}",
     "key 'data.filters.language_threshold'"),
    ("data: {sources: [{name: c, stdlib: true}], filters: {minhash: {bands: 0}}}", "key 'data.filters.minhash.bands'"),
    ("data: {sources: [{name: c, stdlib: true}], filters: {minhash: {threshold: 0}}}",
     "key 'data.filters.minhash.threshold'"),
    ("data: {sources: [{name: c, stdlib: true}], executor: {cpus_per_task: 0}}", "key 'data.executor.cpus_per_task'"),
    ("data: {sources: [{name: c, stdlib: true}], executor: {mem_per_cpu_gb: 0}}", "key 'data.executor.mem_per_cpu_gb'"),
    ("pretrain: {optimizer: {betas: [0.9, 1.0]}}", "key 'pretrain.optimizer.betas.1'"),
    ("pretrain: {optimizer: {eps: -1.0e-8}}", "key 'pretrain.optimizer.eps'"),
    ("pretrain: {optimizer: {weight_decay: -0.1}}", "key 'pretrain.optimizer.weight_decay'"),
    ("pretrain: {optimizer: {clip: -1}}", "key 'pretrain.optimizer.clip'"),
    ("pretrain: {schedule: {min_lr: -1.0e-5}}", "key 'pretrain.schedule.min_lr'"),
    ("pretrain: {parallel: {dp_shard: 0}}", "key 'pretrain.parallel.dp_shard'"),
    ("pretrain: {seq_len: 256, micro_batch: 4, tokens_per_step: 1000}",
     "tokens_per_step (1000) must be a multiple of seq_len x micro_batch (1024)"),
    ("pretrain: {seed: -1}", "key 'pretrain.seed'"),
    ("pretrain: {peak_flops: 0}", "key 'pretrain.peak_flops'"),
    ("eval: {num_fewshot: {arc_it: -1}}", "key 'eval.num_fewshot.arc_it'"),
    ("sft: {datasets: [{hub: a/b, max_examples: 0}]}", "key 'sft.datasets.0.max_examples'"),
    ("dpo: {micro_batch: 0, datasets: [{hub: a/b}]}", "key 'dpo.micro_batch'"),
    ("dpo: {epochs: 0, datasets: [{hub: a/b}]}", "key 'dpo.epochs'"),
    ("dpo: {seq_len: 1, datasets: [{hub: a/b}]}", "key 'dpo.seq_len'"),
    ("sft: {datasets: [{hub: a/b}]}\ndpo: {seq_len: 8192, datasets: [{hub: a/b}]}", "key 'dpo.seq_len': 8192 exceeds"),
    ("model: {overrides: {n_heads: 0}}", "key 'model.overrides.n_heads'"),
    ("model: {overrides: {hidden_size: 30, n_heads: 2, n_kv_heads: 1}}",
     "key 'model.overrides': Value error, hidden_size / n_heads = 15 must be even"),
    ("model: {overrides: {rope_scaling: {low_freq_factor: 4, high_freq_factor: 4}}}",
     "key 'model.overrides.rope_scaling': Value error, high_freq_factor 4.0 must exceed low_freq_factor 4.0"),
]


@pytest.mark.parametrize("body,expected", BOUNDS)
def test_numeric_fields_are_bounded(tmp_path, body, expected):
    from zagreus.recipe import load_recipe

    recipe = tmp_path / "bounds.yaml"
    recipe.write_text(f"name: bounds\n{body}\n")
    with pytest.raises(UserError) as info:
        load_recipe(recipe)
    assert str(info.value).startswith(f"{recipe}: ") and expected in str(info.value), str(info.value)


def sft_recipe(tmp_path: Path, export: Path, **sft) -> Path:
    (tmp_path / "chat.jsonl").write_text(json.dumps(CHAT) + "\n")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"name": "sft", "run_dir": str(tmp_path / "run"), "pretrain": {"loss_chunk": 64},
                                      "sft": {"init": str(export), "datasets": [{"path": "chat.jsonl"}], "seq_len": 64,
                                              "micro_batch": 1, "log_every": 1, "device": "cpu", **sft}}))
    return recipe


def test_negative_epochs_never_mark_the_stage_finished(export, tmp_path):
    from zagreus.post.sft import run_sft
    from zagreus.recipe import load_recipe
    from zagreus.rundir import RunDir

    stage = RunDir(tmp_path / "run").stage("sft")
    line = one_error_line(zagreus("sft", str(sft_recipe(tmp_path, export, epochs=-2))))
    assert "key 'sft.epochs'" in line and not stage.root.exists()
    # A recipe built in Python skips validation: the stage itself refuses to call zero steps finished.
    recipe = load_recipe(sft_recipe(tmp_path, export, epochs=1))
    recipe.sft = recipe.sft.model_copy(update={"epochs": -2})
    with pytest.raises(UserError, match="sft: trained no step"):
        run_sft(recipe)
    assert not stage.finished() and not stage.export.exists()
    # So the corrected rerun trains instead of being skipped.
    run_sft(load_recipe(sft_recipe(tmp_path, export, epochs=1)))
    assert stage.finished() and stage.read_summary()["steps"] == 1


def test_permission_denied_is_one_line(export):
    """EACCES for real: `zagreus export` run as an unprivileged user (root ignores permissions)
    into a folder that user may not write: one line naming the path and the fix, nothing written."""
    import tempfile

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    root = Path(tempfile.mkdtemp(prefix="zagreus-eacces-"))
    try:
        root.chmod(0o755)
        model = root / "model"
        shutil.copytree(export, model)
        for path in [model, *model.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        locked = root / "locked"
        locked.mkdir(mode=0o755)
        done = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                               "zagreus.cli", "export", str(model), "--out", str(locked / "out")],
                              capture_output=True, text=True, cwd=root, env={**os.environ, "HOME": str(root),
                                                                             "OMP_NUM_THREADS": "1"})
        if "zagreus" in done.stderr and "No module named" in done.stderr:
            pytest.skip("the unprivileged user cannot import this checkout")
        line = one_error_line(done)
        assert line.startswith(f"error: {locked / 'out'}: permission denied (EACCES)"), line
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(root)
