"""Dedup as a distributed pass: planted duplicates in units that different tasks handle are found,
with the same survivors for 1, 2 and 4 tasks; a finalize SIGKILLed while it cuts a shard to the
budget resumes to the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_data_filters import change_words, handbook
from test_data_pipeline import LLAMA3, handbook_docs, output_bytes, write_jsonl
from zagreus.data import shards
from zagreus.data.plan import plan_units
from zagreus.data.stage import tokenize_data
from zagreus.recipe import DataSection


def decoded_train_docs(out: Path, source: str, tok) -> list[str]:
    docs = []
    for ds in sorted((out / "train" / source).glob("*.ds")):
        tokens = np.asarray(shards.read_tokens(ds))
        docs += [tok.decode(d[1:].tolist()) for d in np.split(tokens, shards.read_document_ends(ds)[:-1].astype(np.int64))]
    return docs


def test_duplicates_across_tasks_are_removed_with_the_same_survivors_for_1_2_4_tasks(tmp_path, handbook_path,
                                                                                     llama3_tokenizer):
    distinct = [t for t in handbook(handbook_path, "en", 120) if 2500 < len(t) < 12_000][:30]
    copies = {2: change_words(distinct[2], 150),                 # ~1% of the words changed
              7: distinct[7][: int(len(distinct[7]) * 0.97)],    # the last 3% cut
              12: "  " + distinct[12].upper() + "\n",            # the same text once normalised
              19: change_words(distinct[19], 120)}
    planted = distinct[:15] + [copies[2], copies[12]] + distinct[15:] + [copies[7], copies[19]]
    path = write_jsonl(tmp_path / "dups.jsonl", [{"text": t} for t in planted])
    data = DataSection(sources=[{"name": "en", "path": str(path)}],
                       filters={"min_chars": 1, "quality": False, "dedup": "minhash"}, validation_fraction=0,
                       unit_bytes=16 << 10)
    # Where each document lands: work unit u goes to datatrove task u % tasks.
    units = plan_units(data)[1]
    offsets = np.cumsum([0] + [len((json.dumps({"text": t}) + "\n").encode()) for t in planted])[:-1]
    unit_of = [next(u.index for u in units if u.start <= o < u.stop) for o in offsets]
    pairs = [(planted.index(distinct[i]), planted.index(c)) for i, c in copies.items()]
    for tasks in (2, 4):  # some original and its copy are tokenized by different tasks
        assert any(unit_of[a] % tasks != unit_of[b] % tasks for a, b in pairs), (tasks, unit_of)
    survivors, filters = {}, {}
    for tasks in (1, 2, 4):
        executor = {"kind": "local", "workers": 1} if tasks == 1 else {"kind": "datatrove", "workers": 2, "tasks": tasks}
        manifest = tokenize_data(DataSection(**{**data.model_dump(), "executor": executor}), tmp_path / f"t{tasks}",
                                 LLAMA3, show_progress=False)
        assert manifest["phases"]["buckets"]["tasks"] == tasks
        survivors[tasks] = decoded_train_docs(tmp_path / f"t{tasks}", "en", llama3_tokenizer)
        filters[tasks] = manifest["sources"]["en"]["filters"]
    assert survivors[1] == distinct  # every copy removed, every original kept, in order
    assert survivors[2] == survivors[4] == survivors[1]
    assert filters[1] == filters[2] == filters[4] == {
        "exact_dedup": {"docs": 1, "chars": len(copies[12])},
        "minhash_dedup": {"docs": 3, "chars": len(copies[2]) + len(copies[7]) + len(copies[19])}}
    assert output_bytes(tmp_path / "t2") == output_bytes(tmp_path / "t4") == output_bytes(tmp_path / "t1")


KILL_WHILE_CUTTING = """
import os, signal, sys
from pathlib import Path
from zagreus.data.stage import tokenize_data
from zagreus.recipe import DataSection, TokenizerSection
real_truncate = os.truncate

def truncate_then_die(path, size):
    real_truncate(path, size)  # the data file is cut; its index and metadata still say otherwise
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    if sys.argv[3] == "kill":
        os.truncate = truncate_then_die
    data = DataSection.model_validate_json(Path(sys.argv[1]).read_text())
    tokenize_data(data, Path(sys.argv[2]), TokenizerSection(kind="llama3"), show_progress=False)
"""


def test_finalize_killed_while_cutting_a_shard_to_the_budget_resumes_to_the_same_bytes(tmp_path, handbook_path):
    corpus = write_jsonl(tmp_path / "hb.jsonl", handbook_docs(handbook_path, 30))
    data = DataSection(sources=[{"name": "hb", "path": str(corpus)}], filters={"min_chars": 0, "dedup": "none"},
                       tokens=70_000, validation_fraction=0.2, unit_bytes=64 << 10, shard_tokens=10_000,
                       executor={"kind": "local", "workers": 1})
    spec, script = tmp_path / "data.json", tmp_path / "run.py"
    spec.write_text(data.model_dump_json())
    script.write_text(KILL_WHILE_CUTTING)
    ref = tokenize_data(data, tmp_path / "ref", LLAMA3, show_progress=False)
    assert ref["sources"]["hb"]["filters"]["budget"]["docs"] > 0  # the budget cut into a unit

    def run(out: str, mode: str) -> int:
        return subprocess.run([sys.executable, str(script), str(spec), str(tmp_path / out), mode],
                              capture_output=True).returncode

    assert run("killed", "kill") == -signal.SIGKILL
    assert not (tmp_path / "killed" / "manifest.json").exists()
    assert run("killed", "resume") == 0
    assert output_bytes(tmp_path / "killed") == output_bytes(tmp_path / "ref")
    # Nothing is left beside the shards the manifest lists, its own file and the tokenizer identity.
    listed = {f["file"] + suffix for split in ("train", "val") for f in ref["sources"]["hb"][split]["shards"]
              for suffix in ("", ".index", ".metadata")}
    left = {str(p.relative_to(tmp_path / "killed")) for p in (tmp_path / "killed").rglob("*") if p.is_file()}
    assert left == listed | {"manifest.json", "tokenizer-identity.json"}
