"""Data pipeline end to end: ids equal tiktoken's, datatrove reads the shards, any worker count and
any executor give the same bytes, a SIGKILLed run resumes to the same bytes, budgets and splits."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from zagreus.data import shards
from zagreus.data.filters import is_validation, text_digest
from zagreus.data.stage import check_shards, quick_data_section, tokenize_data
from zagreus.errors import UserError
from zagreus.recipe import DataSection, TokenizerSection

LLAMA3 = TokenizerSection(kind="llama3")


def handbook_docs(path: Path, per_lang: int, langs=("en", "it")) -> list[dict]:
    """The first `per_lang` pages of each language, interleaved."""
    docs = [json.loads(line) for line in path.open(encoding="utf-8")]
    by_lang = [[d for d in docs if d["lang"] == lang][:per_lang] for lang in langs]
    return [d for group in zip(*by_lang) for d in group]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def output_bytes(data_dir: Path) -> dict[str, bytes]:
    """Every file a run leaves (shards, manifest, identity), by relative path; the manifest without
    its `phases`, the run's own timings (checked to be there)."""
    out = {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*"))
           if p.is_file() and "logs" not in p.relative_to(data_dir).parts}
    assert not any(".work" in k or ".tmp" in k for k in out), sorted(out)
    if "manifest.json" in out:
        manifest = json.loads(out["manifest.json"])
        assert set(manifest.pop("phases")) >= {"finalize"}
        out["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return out


def read_docs(folder: Path) -> list[np.ndarray]:
    docs = []
    for ds in sorted(folder.glob("*.ds")):
        toks, ends = np.asarray(shards.read_tokens(ds)), shards.read_document_ends(ds)
        docs += np.split(toks, ends[:-1].astype(np.int64))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, handbook_path) -> Path:
    """60 English and Italian handbook pages in one jsonl (~600 KB)."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "hb.jsonl", handbook_docs(handbook_path, 30))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, corpus) -> Path:
    data = quick_data_section([str(corpus)], workers=2)
    data = DataSection(**{**data.model_dump(), "unit_bytes": 64 << 10, "shard_tokens": 40_000})
    out = tmp_path_factory.mktemp("quick")
    tokenize_data(data, out, LLAMA3, show_progress=False)
    return out


def test_shard_ids_equal_tiktoken(quick_run, corpus):
    import tiktoken
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    # Meta's own tiktoken Encoding from the same tokenizer.model: an independent reference.
    meta = MetaTokenizer.get_instance()
    assert isinstance(meta.model, tiktoken.Encoding)
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    expected = [[meta.bos_id] + meta.model.encode_ordinary(t) for t in texts]
    got = read_docs(quick_run / "train" / "input")
    assert len(got) == len(expected) == 60
    assert all(g.tolist() == e for g, e in zip(got, expected))
    manifest = json.loads((quick_run / "manifest.json").read_text())
    src = manifest["sources"]["input"]
    assert src["train"]["tokens"] == sum(map(len, expected))
    assert src["train"]["chars"] == sum(map(len, texts))
    assert len(src["train"]["shards"]) > 1  # shard_tokens 40,000 rolled over
    assert all(s["tokens"] <= 40_000 or s["docs"] == 1 for s in src["train"]["shards"])
    assert manifest["token_dtype"] == "uint32" and manifest["tokenizer"]["bos_id"] == 128000
    for s in src["train"]["shards"]:
        meta_file = shards.read_metadata(quick_run / s["file"])
        assert meta_file == {"tokenizer": "llama3", "token_size": 4, "tokens": s["tokens"]}


def test_manifest_records_where_the_time_went(quick_run):
    """plan, units (2 workers) and finalize, each with wall and CPU seconds and its task count; the
    units' CPU includes the pool's worker processes, so it exceeds what this process spent alone."""
    phases = json.loads((quick_run / "manifest.json").read_text())["phases"]
    assert list(phases) == ["plan", "units", "finalize"]
    assert [p["tasks"] for p in phases.values()] == [1, 2, 1]
    assert all(p["wall_s"] > 0 and p["cpu_s"] > 0 for p in phases.values()), phases
    # Tokenizing ran in two worker processes: their CPU seconds are counted, near 2x the wall at best.
    assert phases["units"]["cpu_s"] > 0.5 * phases["units"]["wall_s"]


def test_datatrove_folder_dataset_reads_our_shards(quick_run):
    from datatrove.utils.dataset import DatatroveFolderDataset

    folder = quick_run / "train" / "input"
    seq = 255
    ds = DatatroveFolderDataset(str(folder), seq_len=seq, token_size=4, return_positions=True)
    flat = np.concatenate([np.asarray(shards.read_tokens(p)) for p in sorted(folder.glob("*.ds"))])
    per_file = [len(shards.read_tokens(p)) // (seq + 1) for p in sorted(folder.glob("*.ds"))]
    assert len(ds) == sum(per_file) > 10
    item = ds[0]
    assert item["input_ids"].tolist() == flat[:seq + 1].tolist()
    # positions come from our .index file: they restart at 0 on every document's BOS
    bos_at = np.flatnonzero(flat[:seq + 1] == 128000)
    assert all(item["positions"][i] == 0 for i in bos_at)
    assert item["positions"][1] == 1


def test_any_worker_count_and_executor_gives_identical_bytes(tmp_path, corpus):
    data = DataSection(
        sources=[{"name": "en", "path": str(corpus), "language": "en", "weight": 3},
                 {"name": "it", "path": str(corpus), "language": "it", "weight": 1}],
        filters={"min_chars": 500, "dedup": "minhash"}, tokens=80_000, validation_fraction=0.2,
        unit_bytes=48 << 10, shard_tokens=10_000)
    outs = {}
    for label, executor in [("1 worker", {"kind": "local", "workers": 1}), ("2 workers", {"kind": "local", "workers": 2}),
                            ("datatrove 3 tasks", {"kind": "datatrove", "workers": 2, "tasks": 3})]:
        d = DataSection(**{**data.model_dump(), "executor": executor})
        tokenize_data(d, tmp_path / label, LLAMA3, show_progress=False)
        outs[label] = output_bytes(tmp_path / label)
    ref = outs["1 worker"]
    assert len([k for k in ref if k.endswith(".ds")]) > 4
    for label, got in outs.items():
        assert got == ref, label
    m = json.loads(ref["manifest.json"])
    en, it = m["sources"]["en"], m["sources"]["it"]
    assert en["budget_tokens"] == 60_000 and it["budget_tokens"] == 20_000
    for s in (en, it):  # the budget is met, overshooting by at most the last document taken
        got = s["train"]["tokens"] + s["val"]["tokens"]
        assert s["budget_tokens"] <= got < s["budget_tokens"] + 20_000
        assert s["val"]["docs"] < s["train"]["docs"]
    assert en["val"]["docs"] + it["val"]["docs"] > 0
    assert it["units"]["used"] < it["units"]["total"]  # the budget stopped reading early


def test_ray_executor_gives_the_local_bytes(tmp_path, corpus):
    """`data.executor.kind: ray` on a real local Ray instance (ray.init() here, 2 CPUs): 3 tasks of
    datatrove's RayPipelineExecutor, then finalize; the same files as our local pool."""
    ray = pytest.importorskip("ray")
    data = DataSection(sources=[{"name": "en", "path": str(corpus), "language": "en"}],
                       filters={"min_chars": 500, "dedup": "exact"}, validation_fraction=0.2, unit_bytes=48 << 10,
                       shard_tokens=10_000)
    tokenize_data(DataSection(**{**data.model_dump(), "executor": {"kind": "local", "workers": 1}}), tmp_path / "local",
                  LLAMA3, show_progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        manifest = tokenize_data(DataSection(**{**data.model_dump(), "executor": {"kind": "ray", "workers": 2,
                                                                                  "tasks": 3}}),
                                 tmp_path / "ray", LLAMA3, show_progress=False)
    finally:
        ray.shutdown()
    assert manifest["phases"]["units"]["tasks"] == 3
    ref = output_bytes(tmp_path / "local")
    assert len([k for k in ref if k.endswith(".ds")]) > 2 and output_bytes(tmp_path / "ray") == ref


def test_validation_split_follows_text_hash(quick_run, corpus, tmp_path):
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    data = DataSection(**{**quick_data_section([str(corpus)], 1).model_dump(), "validation_fraction": 0.25})
    tokenize_data(data, tmp_path, LLAMA3, show_progress=False)
    m = json.loads((tmp_path / "manifest.json").read_text())["sources"]["input"]
    want_val = [t for t in texts if is_validation(text_digest(t)[1], 0.25)]
    assert m["val"]["docs"] == len(want_val) and m["train"]["docs"] == len(texts) - len(want_val)
    assert m["val"]["chars"] == sum(map(len, want_val))
    assert 5 <= len(want_val) <= 25


def test_shards_from_another_tokenizer_are_refused(quick_run, tmp_path, handbook_path):
    from zagreus.tokenizer import train_bpe

    assert check_shards(quick_run, "llama3")["sources"]["input"]["train"]["docs"] == 60
    other = train_bpe([d["text"] for d in handbook_docs(handbook_path, 10)], 400, tmp_path / "bpe")
    with pytest.raises(UserError, match="shards were made with tokenizer llama3"):
        check_shards(quick_run, str(tmp_path / "bpe"))
    assert other.vocab_size == 400


def test_finished_folder_is_reused_and_another_plan_refused(quick_run, corpus):
    before = output_bytes(quick_run)
    data = quick_data_section([str(corpus)], workers=2)
    same = DataSection(**{**data.model_dump(), "unit_bytes": 64 << 10, "shard_tokens": 40_000})
    tokenize_data(same, quick_run, LLAMA3, show_progress=False)
    assert output_bytes(quick_run) == before
    with pytest.raises(UserError, match="already holds shards of another plan"):
        tokenize_data(data, quick_run, LLAMA3, show_progress=False)


KILL_SCRIPT = """
import sys
from pathlib import Path
from zagreus.data.stage import tokenize_data
from zagreus.recipe import DataSection, TokenizerSection
if __name__ == "__main__":
    data = DataSection.model_validate_json(Path(sys.argv[1]).read_text())
    tokenize_data(data, Path(sys.argv[2]), TokenizerSection(kind="llama3"), show_progress=False)
"""


def test_sigkill_at_any_point_then_resume_is_byte_identical(tmp_path, corpus):
    data = DataSection(sources=[{"name": "hb", "path": str(corpus)}], filters={"dedup": "minhash", "min_chars": 300},
                       validation_fraction=0.1, unit_bytes=24 << 10, shard_tokens=15_000,
                       executor={"kind": "local", "workers": 2})
    spec = tmp_path / "data.json"
    spec.write_text(data.model_dump_json())
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    ref = tmp_path / "ref"
    n_units = tokenize_data(data, ref, LLAMA3, show_progress=False)["sources"]["hb"]["units"]["total"]
    out = tmp_path / "killed"

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(spec), str(out)], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def count(pattern: str) -> int:
        return len(list(out.glob(f".work/*/{pattern}")))

    # Kill points in every stage, each a random 0-30 ms after the stage showed progress: signatures
    # (after 1, then 6 units), buckets (one task done), units (after 2, then 8 units), finalize.
    rng = random.Random(12)
    kills, stages = 0, []
    for stage, ready in (("signatures", lambda: count("sigs/*.json") >= 1), ("signatures", lambda: count("sigs/*.json") >= 6),
                         ("buckets", lambda: count("buckets/*.npy") >= 1), ("units", lambda: count("units/*.json") >= 2),
                         ("units", lambda: count("units/*.json") >= 8), ("finalize", lambda: (out / "manifest.json").exists()
                                                                         or count("units/*.json") >= n_units)):
        proc = start()
        deadline = time.time() + 60
        while proc.poll() is None and not ready() and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the pool's workers die too
            kills += 1
            stages.append(stage)
        proc.wait()
    assert {"signatures", "units"} <= set(stages), stages  # the long stages were really killed
    # A worker killed alone (as by the OOM killer): one resumable error line, exit status 2.
    proc = subprocess.Popen([sys.executable, "-c", "from zagreus.cli import main; main()", "data", "tokenize",
                             "--input", str(corpus), "--out", str(tmp_path / "broken"), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while proc.poll() is None and not psutil.Process(proc.pid).children() and time.time() < deadline:
        time.sleep(0.005)
    for child in psutil.Process(proc.pid).children():
        child.kill()
    assert proc.wait(timeout=60) == 2
    assert "error: a worker process died" in proc.stderr.read()
    proc = start()
    assert proc.wait(timeout=120) == 0
    assert output_bytes(out) == output_bytes(ref)
    m = json.loads((ref / "manifest.json").read_text())["sources"]["hb"]
    assert m["units"]["total"] > 10 and m["train"]["docs"] + m["val"]["docs"] > 50


def test_slurm_dry_run_renders_both_jobs(tmp_path, corpus):
    data = DataSection(sources=[{"name": "hb", "path": str(corpus)}], unit_bytes=64 << 10,
                       executor={"kind": "slurm", "tasks": 4, "workers": 2, "partition": "cpu-long",
                                 "time": "12:00:00", "cpus_per_task": 2, "mem_per_cpu_gb": 3})
    scripts = tokenize_data(data, tmp_path / "data", LLAMA3, dry_run=True)
    units = next(s for s in scripts if "--job-name=zagreus-data-units" in s)
    final = next(s for s in scripts if "--job-name=zagreus-data-finalize" in s)
    for line in ("#SBATCH --partition=cpu-long", "#SBATCH --time=12:00:00", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --mem-per-cpu=3072M", "#SBATCH --array=0-3%2", f"source {sys.prefix}/bin/activate",
                 "launch_pickled_pipeline "):
        assert line in units, line
    assert "#SBATCH --array=0-0" in final and "--dependency=afterok:" in final.splitlines()[0]
    pik = next((tmp_path / "data" / "logs").glob("*/units/executor.pik"))
    assert f"launch_pickled_pipeline {pik}" in units
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_stats_cli_prints_the_manifest_table(quick_run):
    from typer.testing import CliRunner

    from zagreus.cli import app

    m = json.loads((quick_run / "manifest.json").read_text())
    res = CliRunner().invoke(app, ["data", "stats", str(quick_run)])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if line.startswith("input") and " train " in line)
    assert f"{m['sources']['input']['train']['tokens']:,}" in row and " 60 " in row
    assert "llama3" in res.output and "uint32" in res.output


def test_recipe_with_trained_tokenizer_and_code_source(tmp_path, corpus):
    """The tiny demo's shape: two languages of one file, stdlib code, a BPE trained first."""
    from typer.testing import CliRunner

    from zagreus.cli import app
    from zagreus.recipe import load_recipe
    from zagreus.tokenizer import load_tokenizer

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: demo
run_dir: {tmp_path / 'run'}
tokenizer: {{train: {{vocab_size: 600, max_chars: 300000}}}}
data:
  sources:
    - {{name: en, path: {corpus}, language: en, weight: 0.4}}
    - {{name: it, path: {corpus}, language: it, weight: 0.4}}
    - {{name: code, stdlib: true, weight: 0.2, max_documents: 30}}
  filters: {{min_chars: 200, dedup: minhash}}
  validation_fraction: 0.1
  shard_tokens: 100000
  executor: {{kind: local, workers: 2}}
model: {{preset: tiny}}
pretrain: {{seq_len: 256}}
""")
    res = CliRunner().invoke(app, ["data", "tokenize", str(recipe), "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    tok = load_tokenizer(str(run / "tokenizer"))
    assert tok.vocab_size == 600 and (run / "tokenizer" / "tokenizer_config.json").is_file()
    m = json.loads((run / "data" / "manifest.json").read_text())
    assert m["token_dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert m["sources"]["code"]["train"]["docs"] + m["sources"]["code"]["val"]["docs"] == 30
    assert m["sources"]["code"]["units"]["used"] < m["sources"]["code"]["units"]["total"]
    # ids in the shards are the trained tokenizer's, BOS first
    docs = read_docs(run / "data" / "train" / "en")
    en_texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")
                if json.loads(line)["lang"] == "en"]
    decoded = [tok.decode(d[1:].tolist()) for d in docs]
    assert all(d[0] == tok.bos_id for d in docs) and set(decoded) <= set(en_texts) and len(set(decoded)) == len(docs)
    assert all(d[1:].tolist() == tok.encode(text) for d, text in zip(docs, decoded))
    assert check_shards(run / "data", str(run / "tokenizer"))["plan"] == m["plan"]
    # a second run finds the finished plan (the trained tokenizer is reused, not retrained)
    before = output_bytes(run / "data")
    assert stage_again(recipe) == m and output_bytes(run / "data") == before
    assert load_recipe(recipe).run_path() == run


def stage_again(recipe: Path) -> dict:
    from zagreus.data.stage import tokenize_recipe
    from zagreus.recipe import load_recipe

    return tokenize_recipe(load_recipe(recipe), show_progress=False)


def test_workers_skip_units_once_finished_earlier_ones_fill_the_budget(tmp_path, corpus, llama3_tokenizer):
    """over_budget adds up the earlier units' summaries as they are finished, by this worker or by
    others (a unit still running at one call counts at a later one), and stays over once over."""
    from zagreus.data import pipeline
    from zagreus.data.plan import make_plan, plan_units

    data = DataSection(sources=[{"name": "en", "path": str(corpus)}, {"name": "it", "path": str(corpus)}],
                       tokens=2_000, unit_bytes=48 << 10)
    data, units, origins = plan_units(data)
    plan = make_plan(data, tmp_path / "out", "llama3", llama3_tokenizer.identity(), units, origins)
    en = [u for u in units if u.source == "en"]
    assert len(en) >= 4 and plan.budgets()["en"] == 1_000
    worker = pipeline.UnitProcessor(plan, threads=1)

    def finish(unit, tokens):
        path = plan.unit_path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"tokens": tokens, "docs": 1}))

    assert not worker.over_budget(en[2])  # nothing finished yet
    finish(en[0], 600)
    assert not worker.over_budget(en[3])  # 600 < 1.25 x 1000; en[1] and en[2] still running
    finish(en[1], 400)
    finish(en[2], 400)
    assert worker.over_budget(en[3])  # 1400 >= 1250
    assert not pipeline.UnitProcessor(plan, threads=1).over_budget(en[1])  # only units before it count
    it_first = next(u for u in units if u.source == "it")
    assert not worker.over_budget(it_first)  # another source, its own budget
