"""`zagreus compare` on lm-eval's own results files and ours, the base-vs-fine-tune delta table,
and the model card embedding the tables a run holds. Every file here is written by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from zagreus.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metric_block(task: str, alias: str | None = None, **metrics: float) -> dict:
    """One entry of lm-eval's `results`: "metric,filter" keys, their stderr, the alias."""
    out: dict = {"alias": alias or task}
    for name, value in metrics.items():
        out[f"{name},none"] = value
        out[f"{name}_stderr,none"] = 0.0123
    return out


def lm_eval_results(results: dict[str, dict], model_args, model_name: str | None = None,
                    group_subtasks: dict[str, list[str]] | None = None, groups: tuple[str, ...] = ()) -> dict:
    """What `lm-eval --output_path` writes (lm-eval 0.4.x), with the keys compare must read past."""
    tasks = [t for t in results if t not in (group_subtasks or {})]
    data = {
        "results": results,
        **({"groups": {g: results[g] for g in groups}} if groups else {}),
        **({"group_subtasks": group_subtasks} if group_subtasks is not None else {}),
        "configs": {t: {"task": t, "dataset_path": f"hub/{t}", "output_type": "multiple_choice", "num_fewshot": 0,
                        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
                    for t in tasks},
        "versions": {t: 1.0 for t in results},
        "n-shot": {t: 0 for t in tasks},
        "higher_is_better": {t: {"acc": True, "acc_norm": True} for t in results},
        "n-samples": {t: {"original": 1000, "effective": 1000} for t in tasks},
        "config": {"model": "hf", "model_args": model_args, "model_num_parameters": 596049920, "model_dtype": "torch.bfloat16",
                   "batch_size": "1", "batch_sizes": [], "device": "cuda:0", "use_cache": None, "limit": None,
                   "bootstrap_iters": 100000, "gen_kwargs": None, "random_seed": 0, "numpy_seed": 1234,
                   "torch_seed": 1234, "fewshot_seed": 1234},
        "git_hash": "8a7d41f", "date": 1735689600.0, "transformers_version": "4.57.1", "lm_eval_version": "0.4.9",
        "upper_git_hash": None, "tokenizer_pad_token": ["<|endoftext|>", "151643"], "eot_token_id": 151645,
        "max_length": 32768, "task_hashes": {}, "model_source": "hf", "total_evaluation_time_seconds": "812.5",
    }
    if model_name:
        data |= {"model_name": model_name, "model_name_sanitized": model_name.replace("/", "__")}
    return data


# Table 7's numbers, MMLU_EN as lm-eval's `mmlu` group over its subtasks.
QWEN = {"arc_challenge": 0.3430, "hellaswag": 0.4742, "mmlu": 0.4013, "arc_it": 0.2729, "hellaswag_it": 0.3598,
        "m_mmlu_it": 0.4025}
LFM2 = {"arc_challenge": 0.2457, "hellaswag": 0.3092, "mmlu": 0.3445, "arc_it": 0.2464, "hellaswag_it": 0.2994,
        "m_mmlu_it": 0.3132}
REPORTED = {"arc_challenge", "hellaswag", "arc_it", "hellaswag_it"}  # acc_norm; the MMLUs report acc


def table7_results(scores: dict[str, float], with_group_subtasks: bool) -> dict[str, dict]:
    """arc/hellaswag with acc_norm the reported score (acc a decoy), the mmlu group over two levels of subtasks."""
    out = {}
    for task, value in scores.items():
        if task == "mmlu":
            out["mmlu"] = metric_block("mmlu", acc=value)
            aliases = ("humanities", "formal_logic", "stem", "astronomy") if with_group_subtasks else \
                (" - humanities", "  - formal_logic", " - stem", "  - astronomy")
            for name, alias, v in zip(("mmlu_humanities", "mmlu_formal_logic", "mmlu_stem", "mmlu_astronomy"), aliases,
                                      (0.11, 0.12, 0.13, 0.14)):
                out[name] = metric_block(name, alias, acc=v)
        elif task in REPORTED:
            out[task] = metric_block(task, acc=0.9, acc_norm=value)
        else:
            out[task] = metric_block(task, acc=value)
    return out


MMLU_SUBTASKS = {"mmlu": ["mmlu_humanities", "mmlu_stem"], "mmlu_humanities": ["mmlu_formal_logic"],
                 "mmlu_stem": ["mmlu_astronomy"]}


@pytest.fixture
def two_lm_eval_outputs(tmp_path) -> tuple[Path, Path]:
    """Qwen as the folder lm-eval writes (two runs: the newer is taken), LFM2 as an older-style lone file."""
    folder = tmp_path / "lm_eval_out" / "Qwen__Qwen3-0.6B"
    folder.mkdir(parents=True)
    stale = lm_eval_results(table7_results({t: 0.0 for t in QWEN}, True), "pretrained=Qwen/Qwen3-0.6B",
                            "Qwen/Qwen3-0.6B", MMLU_SUBTASKS, groups=("mmlu", "mmlu_humanities", "mmlu_stem"))
    (folder / "results_2025-01-01T10-00-00.000001.json").write_text(json.dumps(stale))
    fresh = lm_eval_results(table7_results(QWEN, True), "pretrained=Qwen/Qwen3-0.6B,dtype=bfloat16",
                            "Qwen/Qwen3-0.6B", MMLU_SUBTASKS, groups=("mmlu", "mmlu_humanities", "mmlu_stem"))
    (folder / "results_2025-03-02T09-30-12.345678.json").write_text(json.dumps(fresh, indent=2))
    # No model_name, model_args as a dict, no group_subtasks: the subtasks show in their indented aliases.
    lfm2 = tmp_path / "lfm2.json"
    lfm2.write_text(json.dumps(lm_eval_results(table7_results(LFM2, False), {"pretrained": "LiquidAI/LFM2-350M"})))
    return tmp_path / "lm_eval_out", lfm2


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(open(path, encoding="utf-8")))


def test_compare_reads_lm_eval_files(two_lm_eval_outputs, tmp_path):
    from zagreus.eval.compare import compare

    files = compare(list(two_lm_eval_outputs), tmp_path / "cmp")
    rows = read_csv(tmp_path / "cmp" / "compare.csv")
    # One column for mmlu (the group's own score), none for its subtasks; English first.
    assert rows[0] == ["model", "arc_challenge (acc_norm)", "hellaswag (acc_norm)", "mmlu (acc)", "average_en",
                       "arc_it (acc_norm)", "hellaswag_it (acc_norm)", "m_mmlu_it (acc)", "average_it", "average"]
    assert [r[0] for r in rows[1:]] == ["Qwen3-0.6B", "LFM2-350M"]
    for row, scores in zip(rows[1:], (QWEN, LFM2)):
        en = (scores["arc_challenge"] + scores["hellaswag"] + scores["mmlu"]) / 3
        it = (scores["arc_it"] + scores["hellaswag_it"] + scores["m_mmlu_it"]) / 3
        assert [float(v) for v in row[1:4] + row[5:8]] == [scores[t] for t in ("arc_challenge", "hellaswag", "mmlu",
                                                                                 "arc_it", "hellaswag_it", "m_mmlu_it")]
        assert float(row[4]) == pytest.approx(en, abs=1e-12) and float(row[8]) == pytest.approx(it, abs=1e-12)
        assert float(row[9]) == pytest.approx((en + it) / 2, abs=1e-12)
    # The Markdown row: 4 decimals, averages of the unrounded scores.
    assert "| Qwen3-0.6B | 0.3430 | 0.4742 | 0.4013 | 0.4062 | 0.2729 | 0.3598 | 0.4025 | 0.3451 | 0.3756 |" \
        in (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG_MAGIC and len(files) == 3


def test_load_scores_shapes(two_lm_eval_outputs):
    from zagreus.eval.compare import load_scores

    qwen_dir, lfm2 = two_lm_eval_outputs
    qwen = load_scores(qwen_dir)
    assert qwen["path"].name == "results_2025-03-02T09-30-12.345678.json" and qwen["format"] == "lm-eval"
    assert load_scores(qwen_dir / "Qwen__Qwen3-0.6B")["path"] == qwen["path"]
    arc = qwen["tasks"]["arc_challenge"]
    assert (arc["metric"], arc["value"], arc["samples"], arc["num_fewshot"]) == ("acc_norm", 0.3430, 1000, 0)
    assert arc["metrics"] == {"acc": 0.9, "acc_norm": 0.3430}  # no stderr
    for model in (qwen, load_scores(lfm2)):  # group_subtasks or indented aliases: the same layout
        depths = {t: (e["depth"], e["group"]) for t, e in model["tasks"].items() if t.startswith("mmlu")}
        assert depths == {"mmlu": (0, True), "mmlu_humanities": (1, True), "mmlu_formal_logic": (2, False),
                          "mmlu_stem": (1, True), "mmlu_astronomy": (2, False)}


def test_compare_mixes_ours_and_lm_eval(tmp_path):
    from zagreus.eval.compare import compare
    from zagreus.eval.run import task_entry, write_results

    ours = {"model": "runs/nesso/exports/step-000300", "backend": "zagreus", "tasks": {
        "zagreus_arc_it": task_entry("zagreus_arc_it", {"acc,none": 0.26, "acc_norm,none": 0.2874}, 1169, 0),
        "zagreus_hellaswag_en": task_entry("zagreus_hellaswag_en", {"acc,none": 0.35, "acc_norm,none": 0.4629}, 10042, 0),
        "zagreus_m_mmlu_it": task_entry("zagreus_m_mmlu_it", {"acc,none": 0.2875}, 1444, 5)}}
    write_results(ours, tmp_path / "ours.json")
    theirs = lm_eval_results({"hellaswag": metric_block("hellaswag", acc=0.4, acc_norm=0.4742),
                              "arc_it": metric_block("arc_it", acc=0.25, acc_norm=0.2729)},
                             "pretrained=/models/hf/Qwen3-0.6B/,dtype=bfloat16")
    (tmp_path / "results_2025-03-02T09-30-12.json").write_text(json.dumps(theirs))
    compare([tmp_path / "ours.json", tmp_path / "results_2025-03-02T09-30-12.json"], tmp_path / "cmp")
    rows = read_csv(tmp_path / "cmp" / "compare.csv")
    # The offline tasks share the columns of the lm-eval tasks they mirror.
    assert rows[0] == ["model", "hellaswag (acc_norm)", "average_en", "arc_it (acc_norm)", "m_mmlu_it (acc)",
                       "average_it", "average"]
    assert rows[1] == ["step-000300", "0.4629", "0.4629", "0.2874", "0.2875", str((0.2874 + 0.2875) / 2),
                       str((0.4629 + (0.2874 + 0.2875) / 2) / 2)]
    assert rows[2] == ["Qwen3-0.6B", "0.4742", "0.4742", "0.2729", "", "0.2729", str((0.4742 + 0.2729) / 2)]


def test_bad_results_files_are_one_line(tmp_path, two_lm_eval_outputs):
    from zagreus.eval.compare import compare

    cases = {
        "neither.json": ({"model": "x", "scores": {"arc_it": 0.3}}, "neither a 'tasks' mapping"),
        "no_metric.json": (lm_eval_results({"arc_it": {"alias": "arc_it", "acc_stderr,none": "N/A"}}, "pretrained=a"),
                           "task arc_it has no metric"),
        "ours_empty.json": ({"model": "m", "tasks": {"zagreus_arc_it": {"samples": 3}}}, "task zagreus_arc_it has no score"),
        "list.json": ([1, 2], "neither"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(UserError, match=expected) as err:
            compare([tmp_path / name], tmp_path / "cmp")
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "broken.json").write_text('{"results": {')
    with pytest.raises(UserError, match=r"broken.json:1:\d+: not valid JSON"):
        compare([tmp_path / "broken.json"], tmp_path / "cmp")
    with pytest.raises(UserError, match="results file not found"):
        compare([tmp_path / "missing.json"], tmp_path / "cmp")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no results_\\*.json here"):
        compare([tmp_path / "empty_dir"], tmp_path / "cmp")
    two = two_lm_eval_outputs[0]
    (two / "other__model").mkdir()
    (two / "other__model" / "results_2025-01-01T00-00-00.json").write_text("{}")
    with pytest.raises(UserError, match="several models \\(Qwen__Qwen3-0.6B, other__model\\); pass one"):
        compare([two], tmp_path / "cmp")


def evalita(te: float, hs: float, summ: float, overall: float, arc: float) -> dict:
    """EVALITA as lm-eval reports it (Table 9): the evalita-mp group's own score, tasks with their own metrics,
    textual entailment itself a group over its prompts; plus arc_it outside the group."""
    results = {
        "evalita-mp": metric_block("evalita-mp", acc=overall),
        "evalita-mp_te": metric_block("evalita-mp_te", acc=te),
        "evalita-mp_te_prompt-1": metric_block("evalita-mp_te_prompt-1", acc=te - 0.01),
        "evalita-mp_te_prompt-2": metric_block("evalita-mp_te_prompt-2", acc=te + 0.01),
        "evalita-mp_hs": metric_block("evalita-mp_hs", f1=hs),
        "evalita-sp_sum_task_fp": metric_block("evalita-sp_sum_task_fp", rouge1=summ, rouge2=summ / 2),
        "arc_it": metric_block("arc_it", acc=0.5, acc_norm=arc),
    }
    subtasks = {"evalita-mp": ["evalita-mp_te", "evalita-mp_hs", "evalita-sp_sum_task_fp"],
                "evalita-mp_te": ["evalita-mp_te_prompt-1", "evalita-mp_te_prompt-2"]}
    return lm_eval_results(results, "pretrained=giux78/zagreus-0.4B-ita", None, subtasks, ("evalita-mp", "evalita-mp_te"))


BASE = dict(te=0.5133, hs=0.6056, summ=0.1947, overall=0.3226, arc=0.2874)
TUNED = dict(te=0.5492, hs=0.4340, summ=0.2305, overall=0.3313, arc=0.3020)


def test_delta_table(tmp_path):
    from zagreus.eval.delta import DELTA, delta

    (tmp_path / "base.json").write_text(json.dumps(evalita(**BASE)))
    tuned = evalita(**TUNED) | {"config": {"model": "hf", "model_args": "pretrained=giux78/Open-Zagreus-0.4B"}}
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    files = delta(tmp_path / "base.json", tmp_path / "tuned.json", tmp_path / "out")
    assert [f.name for f in files] == ["delta.md", "delta.csv", "delta.png"]
    rows = read_csv(tmp_path / "out" / "delta.csv")
    assert rows[0] == ["task", "metric", "zagreus-0.4B-ita", "Open-Zagreus-0.4B", DELTA]
    table = {r[0]: (r[1], float(r[2]), float(r[3]), float(r[4])) for r in rows[1:]}
    # The group's row, its tasks (te's prompts folded into te), the task outside it, the average; each its own metric.
    assert list(table) == ["evalita-mp", "evalita-mp_te", "evalita-mp_hs", "evalita-sp_sum_task_fp", "arc_it", "average"]
    keys = {"evalita-mp": "overall", "evalita-mp_te": "te", "evalita-mp_hs": "hs", "evalita-sp_sum_task_fp": "summ",
            "arc_it": "arc"}
    metrics = {"evalita-mp": "acc", "evalita-mp_te": "acc", "evalita-mp_hs": "f1", "evalita-sp_sum_task_fp": "rouge1",
               "arc_it": "acc_norm"}
    for task, key in keys.items():
        assert table[task] == (metrics[task], BASE[key], TUNED[key], TUNED[key] - BASE[key])
    assert table["evalita-mp_hs"][3] == pytest.approx(-0.1716) and table["evalita-sp_sum_task_fp"][3] == pytest.approx(0.0358)
    # The average leaves the group row out: its tasks are in it already.
    counted = ("te", "hs", "summ", "arc")
    base_avg, tuned_avg = (sum(d[k] for k in counted) / 4 for d in (BASE, TUNED))
    assert table["average"][0] == "mean"
    assert table["average"][1:3] == (pytest.approx(base_avg, abs=1e-15), pytest.approx(tuned_avg, abs=1e-15))
    assert table["average"][3] == pytest.approx(tuned_avg - base_avg, abs=1e-15)
    md = (tmp_path / "out" / "delta.md").read_text(encoding="utf-8")
    assert "| evalita-mp_hs | f1 | 0.6056 | 0.4340 | -0.1716 |" in md
    assert (tmp_path / "out" / "delta.png").read_bytes()[:8] == PNG_MAGIC


def test_delta_mixed_formats_and_missing_metric(tmp_path):
    from zagreus.eval.delta import delta_rows
    from zagreus.eval.run import task_entry, write_results

    base = {"model": "runs/nesso/checkpoints/step-004000", "tasks": {
        "zagreus_arc_it": task_entry("zagreus_arc_it", {"acc,none": 0.25, "acc_norm,none": 0.2874}, 1169, 0),
        "zagreus_m_mmlu_it": task_entry("zagreus_m_mmlu_it", {"acc,none": 0.2875}, 1444, 5),
        "zagreus_hellaswag_it": task_entry("zagreus_hellaswag_it", {"acc,none": 0.33, "acc_norm,none": 0.4076}, 9193, 0)}}
    write_results(base, tmp_path / "base.json")
    tuned = lm_eval_results({"arc_it": metric_block("arc_it", acc=0.26, acc_norm=0.3020),
                             "m_mmlu_it": metric_block("m_mmlu_it", acc=0.2530),
                             "ifeval_it": metric_block("ifeval_it", prompt_level_strict_acc=0.2962)},
                            "pretrained=runs/nesso/sft/export", "runs/nesso/sft/export")
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    headers, rows = delta_rows(tmp_path / "base.json", tmp_path / "tuned.json")
    assert headers[2:4] == ["step-004000", "export"]
    assert rows == [["arc_it", "acc_norm", 0.2874, 0.3020, 0.3020 - 0.2874],
                    ["m_mmlu_it", "acc", 0.2875, 0.2530, 0.2530 - 0.2875],
                    ["hellaswag_it", "acc_norm", 0.4076, None, None],  # not scored after fine-tuning: no Δ
                    ["ifeval_it", "prompt_level_strict_acc", None, 0.2962, None],
                    ["average", "mean", (0.2874 + 0.2875) / 2, (0.3020 + 0.2530) / 2,
                     (0.3020 + 0.2530) / 2 - (0.2874 + 0.2875) / 2]]

    tuned["results"]["arc_it"] = metric_block("arc_it", acc=0.26)  # acc_norm missing
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    with pytest.raises(UserError, match=r"tuned.json: task arc_it has no acc_norm score \(it has acc\); evaluate both"):
        delta_rows(tmp_path / "base.json", tmp_path / "tuned.json")


def test_cli_writes_into_the_run_and_the_card_embeds_it(tmp_path, two_lm_eval_outputs):
    from typer.testing import CliRunner

    from zagreus.cli import app
    from zagreus.model.config import ModelConfig
    from zagreus.model.hf import to_llama_config
    from zagreus.release.card import build_model_card
    from zagreus.rundir import RunDir

    run = RunDir(tmp_path / "runs" / "nesso")
    run.checkpoints.mkdir(parents=True)
    export = tmp_path / "release"
    export.mkdir()
    cfg = ModelConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                      max_seq_len=256)
    (export / "config.json").write_text(json.dumps(to_llama_config(cfg)))
    assert "## Evaluation" not in build_model_card(export, run)

    (tmp_path / "base.json").write_text(json.dumps(evalita(**BASE)))
    (tmp_path / "tuned.json").write_text(json.dumps(evalita(**TUNED)))
    runner = CliRunner()
    res = runner.invoke(app, ["compare", *map(str, two_lm_eval_outputs), "--run", str(run.root)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", str(tmp_path / "base.json"), str(tmp_path / "tuned.json"), "--delta",
                              "--run", str(run.root)])
    assert res.exit_code == 0, res.output
    assert "| evalita-mp_hs | f1 | 0.6056 | 0.4340 | -0.1716 |" in res.output
    for suffix in ("md", "csv", "png"):
        assert run.comparison(suffix).is_file() and run.delta(suffix).is_file()

    card = build_model_card(export, run)
    section = card[card.index("## Evaluation"):card.index("## Use")]
    assert run.comparison().read_text(encoding="utf-8").strip() in section
    assert run.delta().read_text(encoding="utf-8").strip() in section
    assert section.index("Against other models") < section.index("Base model against its fine-tune")

    # --out wins over the run's folder; without either, one line saying what to pass.
    res = runner.invoke(app, ["compare", str(tmp_path / "base.json"), "--out", str(tmp_path / "elsewhere")])
    assert res.exit_code == 0 and (tmp_path / "elsewhere" / "compare.md").is_file()
    res = runner.invoke(app, ["compare", str(tmp_path / "base.json")])
    assert isinstance(res.exception, UserError) and "pass --out DIR, or --run RUN_DIR" in str(res.exception)
    res = runner.invoke(app, ["compare", str(tmp_path / "base.json"), "--delta", "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, UserError) and "two results, BASE then FINE-TUNE; got 1" in str(res.exception)
