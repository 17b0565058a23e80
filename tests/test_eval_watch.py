"""`zagreus eval RUN --watch` beside a training run, and the checkpoints `checkpoint.keep_every` keeps.

Three processes: the test, a 2-rank `torchrun ... zagreus pretrain` saving a checkpoint every step
with `keep: 2, keep_every: 2`, and the watcher started before the run has any checkpoint. The
watcher must end by itself after the final step, with a progression table holding exactly the
rows of the checkpoints the run kept, each row scored from that checkpoint.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from test_eval_lm import write_arc_task_files
from test_parallel_pretrain import data_dir, make_recipe  # noqa: F401  (data_dir is a module fixture)

STEPS = 6


def _watch_recipe(data: Path, run: Path) -> Path:
    path = make_recipe(data, run, steps=STEPS, micro_batch=2)
    recipe = yaml.safe_load(path.read_text())
    recipe["pretrain"]["checkpoint"] = {"every": 1, "keep": 2, "keep_every": 2}
    recipe["pretrain"]["eval_every"] = 100  # no in-loop validation: the watcher is what is tested
    recipe["pretrain"]["optimizer"]["lr"] = 3e-2  # scores that move from step to step, so rows tell checkpoints apart
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_watch_scores_the_kept_checkpoints_of_a_running_training(data_dir, tmp_path) -> None:  # noqa: F811
    from zagreus.eval.run import evaluate

    tasks = write_arc_task_files(tmp_path / "bench", n_test=40, n_val=2)
    run = tmp_path / "run"
    recipe = _watch_recipe(data_dir, run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    zagreus = [sys.executable, "-m", "zagreus.cli"]
    watcher = subprocess.Popen(zagreus + ["eval", str(run), "--watch", "--poll", "0.5", "--idle-timeout", "300",
                                          "--tasks", "zagreus_arc_it", "--data-dir", str(tasks), "--device", "cpu"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        trainer = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                  *zagreus[1:], "pretrain", str(recipe)], env=env, capture_output=True, text=True,
                                 timeout=600)
        assert trainer.returncode == 0, trainer.stderr[-4000:]
        out, _ = watcher.communicate(timeout=300)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, out[-4000:]
    assert f"the run's final step {STEPS} is scored" in out, out[-2000:]

    # keep: 2 leaves steps 5 and 6; keep_every: 2 with every: 1 keeps steps 2, 4 and 6 forever.
    kept = sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").iterdir())
    assert kept == [2, 4, 5, 6]
    rows = list(csv.reader(open(run / "eval" / "progression.csv", encoding="utf-8")))
    assert rows[0] == ["checkpoint", "arc_it (acc_norm)", "average"]
    assert [r[0] for r in rows[1:]] == [f"step-{s}" for s in kept]

    # Each row is that checkpoint's own score, as a direct evaluation of it gives.
    assert len({row[1] for row in rows[1:]}) > 1, rows
    for row in rows[1:]:
        direct = evaluate(run / "checkpoints" / f"step-{int(row[0].removeprefix('step-')):06d}", ["zagreus_arc_it"],
                          data_dir=tasks, device="cpu")
        assert float(row[1]) == direct["tasks"]["zagreus_arc_it"]["metrics"]["acc_norm"]
