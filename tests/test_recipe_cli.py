"""Recipe validation: strict keys with one-line errors from the CLI, and the plan of `zagreus check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zagreus.errors import UserError
from zagreus.recipe import dump_recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]


def zagreus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zagreus.cli", *args], capture_output=True, text=True)


def test_typo_in_key_is_one_line(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: x\npretrain:\n  seq_len: 256\n  optimizer: {lr: 1.0e-3, wieght_decay: 0.1}\n")
    result = zagreus("check", str(recipe))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(recipe) in lines[0]
    assert "pretrain.optimizer.wieght_decay" in lines[0]
    assert "did you mean 'weight_decay'" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "body,expected",
    [
        ("name: x\npretrain: {steps: many}\n", "key 'pretrain.steps'"),
        ("name: x\ndata:\n  sources:\n    - {name: a, path: does-not-exist/*.jsonl}\n", "no file matches does-not-exist/*.jsonl"),
        ("pretrain: {steps: 3}\n", "missing required key 'name'"),
        ("name: x\nmodel: {preset: zagreus-9b}\n", "unknown model preset 'zagreus-9b'"),
        ("name: [unclosed\n", "not valid YAML at line"),
        ("name: x\ndata:\n  sources:\n    - {name: a, hub: some/dataset, path: x.jsonl}\n", "exactly one of hub"),
        ("name: x\npretrain: {steps: -5}\n", "key 'pretrain.steps': Input should be greater than or equal to 1"),
        ("name: ../../etc\n", "key 'name': String should match pattern"),
        ("nme: x\n", "unknown key 'nme'; did you mean 'name'?"),
    ],
)
def test_bad_recipes(tmp_path, body, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(body)
    with pytest.raises(UserError) as info:
        load_recipe(recipe)
    assert expected in str(info.value)
    assert str(recipe) in str(info.value)


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        recipe = load_recipe(path, check_inputs=False)
        # The dump is itself a valid recipe, defaults filled in.
        dumped = path.parent / f".{path.stem}.resolved.yaml"
        try:
            dumped.write_text(dump_recipe(recipe))
            assert load_recipe(dumped, check_inputs=False) == recipe.model_copy(update={"source_path": dumped.resolve()})
        finally:
            dumped.unlink()


@pytest.mark.parametrize("lang", ["ita", "spa", "fra", "por"])
def test_report_recipes_add_no_filtering(lang):
    """The report's sources come filtered and deduplicated by their publishers, and the report adds
    no filtering of its own: no dedup, no length, language or quality rule."""
    from zagreus.data.filters import length_ok
    f = load_recipe(REPO / f"recipes/zagreus-0.4b-{lang}.yaml", check_inputs=False).data.filters
    assert (f.dedup, f.quality, f.min_chars, f.max_chars, f.languages) == ("none", False, 0, None, None)
    assert length_ok("", f.min_chars, f.max_chars) and length_ok("x" * 50_000_000, f.min_chars, f.max_chars)


def test_tiny_recipe_keeps_its_filters():
    f = load_recipe(REPO / "recipes/tiny.yaml", check_inputs=False).data.filters
    assert (f.dedup, f.quality, f.min_chars) == ("minhash", True, 200)
    from zagreus.data.filters import length_ok
    assert not length_ok("x" * 199, f.min_chars, f.max_chars)


def test_model_info_counts():
    result = zagreus("model", "info", "zagreus-0.4b")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == {"total": 437_760_960, "embedding": 123_125_760, "non_embedding": 314_635_200}
    # 6 x (non-embedding matmul weights + tied output head) + 12 x layers x width x seq.
    matmul = 314_635_200 - 65 * 960 + 128256 * 960
    assert info["flops_per_token"] == 6 * matmul + 12 * 32 * 960 * 4096


def test_usage_errors_are_one_message_without_traceback():
    result = zagreus("no-such-verb")
    assert result.returncode == 2
    assert "No such command 'no-such-verb'" in result.stderr and "Traceback" not in result.stderr
    result = zagreus("model", "info", "tiny", "--bogus")
    assert result.returncode == 2 and "No such option" in result.stderr and "Traceback" not in result.stderr


def test_check_prints_the_plan(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "ciao"}\n')
    recipe = tmp_path / "plan.yaml"
    recipe.write_text(f"name: plan\nrun_dir: {tmp_path / 'run'}\ndata:\n  sources: [{{name: docs, path: docs.jsonl}}]\n"
                      "model: {preset: tiny}\npretrain: {seq_len: 256}\neval: {tasks: [zagreus_arc_it]}\n")
    result = zagreus("check", str(recipe))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"recipe {recipe}: OK", f"  run directory : {tmp_path / 'run'}",
                         "  stages        : data -> pretrain -> eval -> release"]
    assert any(line.startswith("  model         : tiny, ") for line in lines)
    assert "  source docs        : 100.0% of tokens from docs.jsonl" in lines


def test_check_prices_the_data_stage_of_the_report_recipe():
    """`zagreus check zagreus-0.4b-ita.yaml`: text, work units, disk and CPU-hours of its 1T-token data
    stage, from the measured rates (13,842,558 tokens of 56.9 MB in 3.71 CPU seconds) by hand."""
    result = zagreus("check", str(REPO / "recipes" / "zagreus-0.4b-ita.yaml"))
    assert result.returncode == 0, result.stderr
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in result.stdout.splitlines() if ":" in line}
    text_bytes = 1e12 * 56.9e6 / 13_842_558
    assert f"about {text_bytes / 1e12:.2f} TB of text" in lines["data volume"]  # 4.11 TB
    units = round(text_bytes / (4 << 20))  # the recipe's unit_bytes default, 4 MiB
    assert f"{units:,} work units over 512 tasks" in lines["data units"]
    # Llama-3 ids are uint32: 4 bytes a token, 4 TB for 1T; workers write the final shards and the
    # report's recipes do not deduplicate, so nothing else is on disk at the peak.
    assert "4.00 TB of final shards, 4.00 TB at the peak" in lines["data disk"]
    assert "3 to 5 TB for ~1T tokens (3.0-5.0 TB here)" in lines["data disk"]
    cpu_hours = 1e12 / (13_842_558 / 3.71) / 3600
    assert f"{cpu_hours:,.0f} CPU-hours" in lines["data CPU"] and f"{cpu_hours / 512:,.1f} h on 512 tasks" in lines["data CPU"]
