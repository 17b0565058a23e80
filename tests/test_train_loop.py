"""The pretraining loop end to end: exact resume after SIGKILL, skipped non-finite steps, learning.

Runs are real `zagreus pretrain` invocations on a recipe and a run directory made here: a small
BPE trained on the shared handbook corpus, shards written with ShardWriter, a tiny model.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from zagreus.data.shards import ShardWriter, write_identity
from zagreus.tokenizer import train_bpe

HANDBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "handbook-5lang.jsonl"


def _docs(langs=("en", "it"), max_chars: int = 400_000) -> dict[str, list[str]]:
    if not HANDBOOK.is_file():
        pytest.skip(f"{HANDBOOK} is absent")
    docs: dict[str, list[str]] = {lang: [] for lang in langs}
    seen = Counter()
    with open(HANDBOOK, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            lang = record.get("lang")
            if lang in docs and seen[lang] < max_chars:
                docs[lang].append(record["text"])
                seen[lang] += len(record["text"])
    return docs


def make_run(tmp: Path, *, vocab: int = 512, max_chars: int = 400_000, val_docs: int = 4, **pretrain) -> Path:
    """A run directory with tokenizer/, data/{train,val}/<lang>/ shards and a recipe; returns the recipe path."""
    docs = _docs(max_chars=max_chars)
    run = tmp / "run"
    tok = train_bpe((t for texts in docs.values() for t in texts), vocab, run / "tokenizer")
    data = run / "data"
    for lang, texts in docs.items():
        for split, part in (("train", texts[:-val_docs]), ("val", texts[-val_docs:])):
            writer = ShardWriter(data / split / lang / "00000.ds", tok.name, tok.vocab_size)
            for ids in tok.encode_batch(part):
                writer.write([tok.bos_id] + ids)
            writer.close()
    write_identity(data, tok.identity())
    section = {"seq_len": 32, "micro_batch": 4, "steps": 12, "seed": 3, "log_every": 1, "eval_every": 1000,
               "eval_batches": 2, "loss_chunk": 50, "device": "cpu",
               "optimizer": {"lr": 3e-3}, "schedule": {"kind": "wsd", "warmup": 3, "decay": 4},
               "checkpoint": {"every": 3, "keep": 2}}
    section.update(pretrain)
    recipe = {"name": "t", "run_dir": str(run), "tokenizer": {"path": str(run / "tokenizer")},
              "model": {"preset": "tiny", "overrides": {"hidden_size": 64, "n_layers": 2, "n_heads": 4,
                                                         "n_kv_heads": 2, "intermediate_size": 128}},
              "pretrain": section}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env() -> dict:
    # Same thread count in every run: fp32 CPU results are bitwise reproducible only then.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def pretrain(recipe: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zagreus.cli", "pretrain", str(recipe)], env=_env(),
                          capture_output=True, text=True, **kw)


@pytest.fixture
def one_thread():
    """In-process runs on one thread: on a shared 2-core machine OpenMP teams of 2 stall each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_exact_resume_after_sigkill(tmp_path):
    """Killed at a random step after a checkpoint and resumed: every loss bitwise equal to an uninterrupted run."""
    overrides = dict(seq_len=64, micro_batch=8, steps=40, eval_every=10, checkpoint={"every": 5, "keep": 2},
                     tokens_per_step=1024)  # 2 micro-steps of accumulation
    whole = make_run(tmp_path / "whole", **overrides)
    done = pretrain(whole)
    assert done.returncode == 0, done.stderr
    reference = losses(tmp_path / "whole" / "run")
    assert sorted(reference) == list(range(1, 41))

    killed = make_run(tmp_path / "killed", **overrides)
    run = tmp_path / "killed" / "run"
    target = random.Random().randint(7, 33)  # after the first checkpoint (step 5), before the end
    proc = subprocess.Popen([sys.executable, "-m", "zagreus.cli", "pretrain", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run) or [0]) >= target:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before step {target}"
    from zagreus.rundir import list_checkpoints

    saved = [s for s, _ in list_checkpoints(run)]
    assert saved and 5 <= saved[-1] < 40, saved
    resumed = pretrain(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoints'}" in resumed.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert got[step] == reference[step], f"step {step} (killed at {target}, resumed from {saved[-1]})"
    val = lambda r: [(x["step"], x["val_loss"]) for x in map(json.loads, (r / "metrics.jsonl").read_text().splitlines()) if "val_loss" in x]
    assert val(run) == val(tmp_path / "whole" / "run") and len(val(run)) == 4
    meta = json.loads((run / "checkpoints" / "step-000040" / "meta.json").read_text())
    assert meta["tokens"] == 40 * 1024 and sum(meta["tokens_per_source"].values()) == 40 * 1024
    assert set(meta["tokens_per_source"]) == {"en", "it"}


def test_missing_data_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "run_dir": str(tmp_path / "nothing"), "model": {"preset": "tiny"}}))
    out = pretrain(recipe)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "run `zagreus data tokenize" in out.stderr and "no tokenized data" in out.stderr


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch, one_thread):
    """NaN losses at steps 5-6 are skipped (weights untouched) and counted; 3 in a row stop the run cleanly."""
    import torch

    from zagreus.recipe import load_recipe
    from zagreus.train import loop
    from zagreus.rundir import list_checkpoints

    recipe = make_run(tmp_path, steps=20, max_bad_steps=3, checkpoint={"every": 1, "keep": 50})
    real_loss = loop.compute_loss
    calls: list[torch.Tensor] = []
    poison = {5, 6} | set(range(10, 21))  # 1-based steps whose loss is NaN

    def injected(model, batch, chunk_tokens):
        calls.append(model.layers["0"].mlp.up_proj.weight.detach().clone())
        loss = real_loss(model, batch, chunk_tokens)
        return loss * float("nan") if len(calls) in poison else loss

    monkeypatch.setattr(loop, "compute_loss", injected)
    with pytest.raises(loop.TrainingDiverged) as err:
        loop.run_pretrain(load_recipe(recipe))
    run = tmp_path / "run"
    assert "3 non-finite steps in a row" in str(err.value) and "step 12" in str(err.value)
    assert str(run / "checkpoints" / "step-000009") in str(err.value)
    # Skipped updates leave the weights alone; good steps change them.
    assert torch.equal(calls[4], calls[5]) and torch.equal(calls[5], calls[6])
    assert not torch.equal(calls[3], calls[4]) and not torch.equal(calls[6], calls[7])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert by_step[4]["skipped_steps"] == 0 and by_step[6]["skipped_steps"] == 2 and by_step[9]["skipped_steps"] == 2
    assert math.isfinite(by_step[9]["loss"]) and math.isnan(by_step[12]["loss"]) and by_step[12]["stopped"]
    # No checkpoint while the steps were bad; the last good one is complete and loads.
    steps = [s for s, _ in list_checkpoints(run)]
    assert steps == [1, 2, 3, 4, 7, 8, 9]
    meta = json.loads((run / "checkpoints" / "step-000009" / "meta.json").read_text())
    assert meta["skipped_steps"] == 2
    from zagreus.checkpoint import load_checkpoint_model

    model, _ = load_checkpoint_model(run)
    assert torch.equal(model.layers["0"].mlp.up_proj.weight, calls[9])


@pytest.mark.slow
def test_tiny_model_learns_far_below_unigram_entropy(tmp_path, one_thread):
    """The tiny preset, 600 short steps on the handbook: validation loss far below the unigram entropy.

    Short windows and small batches: the model needs optimizer steps more than tokens to leave the
    unigram plateau, and each step stays cheap (15-25 s in all on one core).
    """
    import numpy as np

    from zagreus.data.shards import read_tokens
    from zagreus.recipe import load_recipe
    from zagreus.train.loop import run_pretrain

    recipe = make_run(tmp_path, vocab=1024, max_chars=300_000, val_docs=6, seq_len=32, micro_batch=8, steps=600,
                      log_every=100, eval_every=600, eval_batches=16, loss_chunk=256, optimizer={"lr": 5e-3},
                      schedule={"kind": "wsd", "warmup": 20, "decay": 150}, checkpoint={"every": 600, "keep": 1})
    r = load_recipe(recipe)
    r.model.overrides = {}  # the tiny preset itself (d=128, 4 layers, 4 heads), vocabulary from the tokenizer
    last = run_pretrain(r)
    run = tmp_path / "run"
    # Unigram entropy (nats/token) of the training tokens: the loss of the best context-free model.
    counts = np.zeros(1024, dtype=np.int64)
    for shard in (run / "data" / "train").glob("*/*.ds"):
        counts += np.bincount(read_tokens(shard), minlength=1024)
    probs = counts[counts > 0] / counts.sum()
    unigram = float(-(probs * np.log(probs)).sum())
    assert unigram > 5.5  # a 1k BPE over English and Italian is far from trivial
    # Measured: about 6.08 nats unigram vs 5.0-5.1 validation; ask for 0.75 nats (a 53% lower perplexity).
    assert last["val_loss"] < unigram - 0.75, (last["val_loss"], unigram)
    assert 0 < last["val_bpb"] < 3.0


def test_activation_checkpointing_gives_the_same_losses(tmp_path, one_thread):
    from zagreus.recipe import load_recipe
    from zagreus.train.loop import run_pretrain

    results = []
    for ac in (False, True):
        recipe = make_run(tmp_path / str(ac), steps=4, activation_checkpointing=ac, checkpoint={"every": 100, "keep": 1})
        run_pretrain(load_recipe(recipe))
        results.append(losses(tmp_path / str(ac) / "run"))
    assert results[0] == results[1] and len(results[0]) == 4


def _okapi_arc(folder: Path, n: int = 10) -> None:
    """A small multiple-choice set in the okapi ARC format the offline zagreus_arc_it task reads."""
    rng = random.Random(1)
    words = "il calore si sposta dalla mano al cubetto di ghiaccio freddo acqua sole luna terra".split()
    items = [{"id": f"q{i}", "answer": "ABCD"[i % 4], "instruction": " ".join(rng.choices(words, k=8)) + "?",
              **{f"option_{x}": " ".join(rng.choices(words, k=4)) for x in "abcd"}} for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m_arc_it_test.json").write_text(json.dumps(items))
    (folder / "m_arc_it_validation.json").write_text(json.dumps(items[:3]))


def test_quick_eval_during_pretraining(tmp_path):
    """eval.quick_task scores the model at every eval interval, equal to scoring the saved checkpoint
    afterwards, and leaves the training losses bitwise as they are without it."""
    from zagreus.eval.run import quick_mc_eval
    from zagreus.checkpoint import load_checkpoint_model

    overrides = dict(steps=6, eval_every=3, checkpoint={"every": 3, "keep": 2})
    plain = make_run(tmp_path / "plain", **overrides)
    assert pretrain(plain).returncode == 0
    quick = make_run(tmp_path / "quick", **overrides)
    _okapi_arc(tmp_path / "bench")
    recipe = yaml.safe_load(quick.read_text())
    recipe["eval"] = {"quick_task": "zagreus_arc_it", "quick_limit": 8, "data_dir": str(tmp_path / "bench")}
    quick.write_text(yaml.safe_dump(recipe))
    done = pretrain(quick)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "quick" / "run"
    assert losses(run) == losses(tmp_path / "plain" / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "zagreus_arc_it/acc" in r}
    assert sorted(scored) == [3, 6]
    model, tokenizer = load_checkpoint_model(run / "checkpoints" / "step-000006")
    again = quick_mc_eval(model, tokenizer, "zagreus_arc_it", 8, data_dir=tmp_path / "bench")
    assert scored[6]["zagreus_arc_it/acc"] == again["acc"]
    assert scored[6]["zagreus_arc_it/acc_norm"] == again["acc_norm"]


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(tmp_path):
    """SIGTERM (Slurm's requeue) mid-run: the step in flight ends, a checkpoint of it is saved (none
    is due by the schedule), the process exits 143, and the resumed run matches an uninterrupted one."""
    overrides = dict(steps=30, checkpoint={"every": 1000, "keep": 2})
    whole = make_run(tmp_path / "whole", **overrides)
    assert pretrain(whole).returncode == 0
    reference = losses(tmp_path / "whole" / "run")

    stopped = make_run(tmp_path / "stopped", **overrides)
    run = tmp_path / "stopped" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "zagreus.cli", "pretrain", str(stopped)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(losses(run) or [0]) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    from zagreus.rundir import list_checkpoints

    saved = [s for s, _ in list_checkpoints(run)]
    assert len(saved) == 1 and 5 <= saved[0] < 30, saved
    assert max(losses(run)) == saved[0]  # stopped right after the step it saved
    resumed = pretrain(stopped)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(run) == reference
