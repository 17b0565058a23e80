"""Every-checkpoint evaluation with its cache, progression tables and plot, model comparison,
the quick in-loop eval, and the errors for unknown tasks and runs without checkpoints."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from test_eval_lm import build_export, okapi_items, write_arc_task_files

from zagreus.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from zagreus.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok")
    train_bpe([" ".join(str(v) for v in item.values()) for item in okapi_items(200, seed=2)], 512, out)
    return out


def save_checkpoint(run_dir: Path, step: int, tokenizer_dir: Path, seed: int) -> Path:
    """A real pretraining checkpoint (DCP + meta.json) of the test model, tokenizer in the run dir."""
    from zagreus.model.hf import load_hf
    from zagreus.checkpoint import save_checkpoint as save

    export = build_export(run_dir / "exports" / f"step-{step}", tokenizer_dir, seed=seed)
    if not (run_dir / "tokenizer").is_dir():
        shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
    model = load_hf(export)
    return save(run_dir / "checkpoints", step, model, None, meta={"model_config": model.cfg.model_dump()})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_arc_task_files(tmp_path_factory.mktemp("bench"), n_test=8, n_val=2)


def test_progression_caches_checkpoints(tmp_path, tokenizer_dir, data_dir, monkeypatch):
    from zagreus.eval import run
    from zagreus.eval.progression import evaluate_run

    for i, step in enumerate((100, 200, 300)):
        save_checkpoint(tmp_path, step, tokenizer_dir, seed=i)
    calls = []
    real_evaluate = run.evaluate

    def counting_evaluate(model, *args, **kwargs):
        calls.append(Path(model).name)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(run, "evaluate", counting_evaluate)
    steps, files = evaluate_run(tmp_path, ["zagreus_arc_it"], limit=6, data_dir=data_dir)
    assert steps == [100, 200, 300] and len(calls) == 3
    eval_dir = tmp_path / "eval"
    rows = list(csv.reader(open(eval_dir / "progression.csv", encoding="utf-8")))
    assert rows[0] == ["checkpoint", "arc_it (acc_norm)", "average"]
    assert [r[0] for r in rows[1:]] == ["step-100", "step-200", "step-300"]
    cached = json.loads((eval_dir / "step-000200.json").read_text())["tasks"]["zagreus_arc_it"]
    assert float(rows[2][1]) == cached["metrics"]["acc_norm"] == float(rows[2][2])
    assert (eval_dir / "progression.png").read_bytes()[:8] == PNG_MAGIC
    assert "| step-300 |" in (eval_dir / "progression.md").read_text(encoding="utf-8")
    assert set(files) == {eval_dir / f"progression.{x}" for x in ("md", "csv", "png")}

    # A fourth checkpoint: only it is evaluated on the rerun.
    save_checkpoint(tmp_path, 400, tokenizer_dir, seed=3)
    calls.clear()
    steps, _ = evaluate_run(tmp_path, ["zagreus_arc_it"], limit=6, data_dir=data_dir)
    assert steps == [400] and calls == ["step-000400"]
    rows = list(csv.reader(open(eval_dir / "progression.csv", encoding="utf-8")))
    assert [r[0] for r in rows[1:]] == ["step-100", "step-200", "step-300", "step-400"]
    # The rerun kept the earlier numbers.
    assert json.loads((eval_dir / "step-000200.json").read_text())["tasks"]["zagreus_arc_it"] == cached


def test_quick_mc_eval_matches_export(tmp_path, tokenizer_dir, data_dir):
    from zagreus.eval.run import evaluate, quick_mc_eval
    from zagreus.model.hf import load_hf
    from zagreus.tokenizer import load_tokenizer

    export = build_export(tmp_path / "export", tokenizer_dir, seed=5)
    model = load_hf(export).train()
    quick = quick_mc_eval(model, load_tokenizer(str(export)), "zagreus_arc_it", limit=8, data_dir=data_dir)
    assert model.training
    full = evaluate(export, ["zagreus_arc_it"], limit=8, data_dir=data_dir)
    assert quick == full["tasks"]["zagreus_arc_it"]["metrics"]


def test_compare_table_and_chart(tmp_path):
    from zagreus.eval.compare import compare
    from zagreus.eval.run import write_results

    def result(model: str, scores: dict[str, float]) -> dict:
        return {"model": model, "tasks": {t: {"metrics": {m: v for m in ("acc", "acc_norm")}} for t, v in scores.items()}}

    write_results(result("runs/a/exports/step-10", {"arc_challenge": 0.30, "hellaswag": 0.46, "arc_it": 0.28,
                                                    "zagreus_m_mmlu_it": 0.29}), tmp_path / "a.json")
    write_results(result("b-model", {"arc_challenge": 0.34, "hellaswag": 0.47, "arc_it": 0.27}), tmp_path / "b.json")
    files = compare([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "cmp")
    rows = list(csv.reader(open(tmp_path / "cmp" / "compare.csv", encoding="utf-8")))
    assert rows[0] == ["model", "arc_challenge (acc_norm)", "hellaswag (acc_norm)", "average_en",
                       "arc_it (acc_norm)", "m_mmlu_it (acc)", "average_it", "average"]
    a, b = rows[1], rows[2]
    assert a[0] == "step-10" and b[0] == "b-model"
    assert float(a[3]) == pytest.approx(0.38) and float(a[6]) == pytest.approx(0.285)
    assert float(a[7]) == pytest.approx((0.38 + 0.285) / 2)
    # b has no m_mmlu_it: an empty cell, and the Italian average over what is there.
    assert b[5] == "" and float(b[6]) == pytest.approx(0.27)
    assert "| b-model | 0.3400 | 0.4700 | 0.4050 | 0.2700 | — |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert len(files) == 3


def test_unknown_task_lists_closest_names():
    from zagreus.eval.registry import check_task_names

    with pytest.raises(UserError) as err:
        check_task_names(["zagreus_arc_it", "hellaswag_itt"])
    msg = str(err.value)
    assert "unknown task 'hellaswag_itt'" in msg
    assert "hellaswag_it" in msg.split("closest:")[1] and "zagreus_hellaswag_it" in msg.split("closest:")[1]
    check_task_names(["arc_it", "zagreus_arc_it", "hellaswag"])  # known ones pass


def test_run_without_checkpoints_is_a_clear_error(tmp_path):
    from zagreus.eval.progression import evaluate_run

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no checkpoints .*step-N"):
        evaluate_run(tmp_path, ["zagreus_arc_it"])
    with pytest.raises(UserError, match="no such run directory"):
        evaluate_run(tmp_path / "missing", ["zagreus_arc_it"])


def test_offline_task_without_data_dir_names_the_files(tmp_path):
    from zagreus.eval.registry import task_specs

    with pytest.raises(UserError, match="pass --data-dir .*m_arc_it_test.json"):
        task_specs(["zagreus_arc_it"])
    with pytest.raises(UserError, match="m_arc_it_test.json not found"):
        task_specs(["zagreus_arc_it"], tmp_path)


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "zagreus.cli", "eval", str(tmp_path), "--every-checkpoint",
                           "--tasks", "zagreus_arc_it"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: no checkpoints (expected {tmp_path}/checkpoints/"
                                                f"step-N folders with meta.json); run `zagreus pretrain` first or "
                                                f"pass a model folder without --every-checkpoint"]


def test_cli_every_checkpoint_takes_the_recipe_eval_section(tmp_path, tokenizer_dir, data_dir):
    from typer.testing import CliRunner

    from zagreus.cli import app

    save_checkpoint(tmp_path, 50, tokenizer_dir, seed=7)
    (tmp_path / "recipe.yaml").write_text(
        f"name: t\neval:\n  tasks: [zagreus_arc_it]\n  limit: 4\n  data_dir: {data_dir}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--every-checkpoint"])
    assert result.exit_code == 0, result.output
    assert "evaluated 1 new checkpoint(s): step-50" in result.output
    cached = json.loads((tmp_path / "eval" / "step-000050.json").read_text())["tasks"]["zagreus_arc_it"]
    assert cached["samples"] == 4 and cached["settings"] == {"num_fewshot": None, "limit": 4}
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "checkpoints" / "step-000050"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["tasks"]["zagreus_arc_it"]["metrics"] == cached["metrics"]


def test_offline_alternatives_for_hub_tasks():
    from zagreus.eval.registry import offline_alternative, report_metric, task_language

    assert offline_alternative("arc_it") == "zagreus_arc_it"
    assert offline_alternative("hellaswag") == "zagreus_hellaswag_en"
    assert offline_alternative("arc_challenge") == "zagreus_arc_challenge_en"
    assert offline_alternative("ifeval") is None
    # The report's metric and language per task name.
    assert [report_metric(t) for t in ("m_mmlu_it", "mmlu", "zagreus_hellaswag_en", "arc_easy", "ifeval")] == \
        ["acc", "acc", "acc_norm", "acc_norm", "prompt_level_strict_acc"]
    assert [task_language(t) for t in ("zagreus_arc_it", "hellaswag_fr", "mmlu")] == ["it", "fr", "en"]
