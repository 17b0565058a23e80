"""The layer order of docs/architecture.md holds for every import under src/zagreus, including
imports inside functions: nothing imports upwards, and no two packages of one layer import each other."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "zagreus"
DOC = ROOT / "docs" / "architecture.md"


def layers() -> dict[str, int]:
    """Package (or top-level module) name -> its layer index, from the fenced block between the markers."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\s*```\n(.*?)```\s*<!-- /layers -->", text, re.DOTALL)
    assert block, f"{DOC}: no layers block between <!-- layers --> and <!-- /layers -->"
    order = {}
    for i, line in enumerate(block.group(1).strip().splitlines()):
        for name in line.split():
            order[name] = i
    return order


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name: 'zagreus.train.loop' -> 'train'; any commands module -> 'cli'."""
    parts = module.split(".")
    if parts[-1] in ("commands", "cli"):
        return "cli"
    return parts[1] if len(parts) > 1 else "zagreus"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported zagreus module) for every import statement in the file, wherever it sits."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "zagreus"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "zagreus":
                continue
            if base == "zagreus":  # `from zagreus import x`: x may be a module or a name of __init__
                found += [(node.lineno, f"zagreus.{a.name}" if (SRC / f"{a.name}.py").exists()
                           or (SRC / a.name).is_dir() else "zagreus") for a in node.names]
            else:
                found.append((node.lineno, base))
    return found


def upward_imports() -> list[str]:
    order = layers()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        importer = module_name(path)
        src_unit = unit_of(importer)
        if src_unit not in order:
            problems.append(f"{path.relative_to(ROOT)}: '{src_unit}' is in no layer of {DOC.name}")
            continue
        for line, imported in imports_of(path):
            dst_unit = unit_of(imported)
            if dst_unit not in order:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}, whose '{dst_unit}' is in no layer")
            elif dst_unit != src_unit and order[dst_unit] >= order[src_unit]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {src_unit} (layer {order[src_unit]}) imports "
                                f"{imported} ({dst_unit}, layer {order[dst_unit]})")
    return problems


def test_imports_point_down_the_layers():
    problems = upward_imports()
    assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a model module importing train is reported."""
    fake = tmp_path / "zagreus"
    (fake / "model").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "model" / "bad.py").write_text("def f():\n    from zagreus.train.loop import run\n")
    (fake / "train" / "good.py").write_text("from zagreus.model import bad\nfrom . import good\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = upward_imports()
    assert problems == ["zagreus/model/bad.py:2: model (layer 3) imports zagreus.train.loop (train, layer 8)"]


def test_the_cli_loads_without_torch():
    """`zagreus --help` assembles every commands module; none may pull in torch (seconds) at import."""
    import subprocess

    code = "import sys, zagreus.cli; heavy = [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
