"""Post-training data: read chat and preference datasets from local files (jsonl, json, parquet)
or the Hugging Face hub, and turn every row into one normalised example.

Formats (`format:` of a dataset in the recipe; "auto" looks at the columns):
- messages: `messages` = list of {role, content, tool_calls?}, optional `tools` (list or JSON string)
- conversation: OpenItalianData's `conversation` column (list of {role, content}); ShareGPT's
  `conversations` with {from, value} is read the same way
- prompt_completion: `prompt` and `completion`, each a string or a list of messages
- preference: `prompt`, `chosen`, `rejected`, each a string or a list of messages (chosen and
  rejected may repeat the prompt's messages, as in UltraFeedback; the shared part is dropped)

Rows without an assistant turn are skipped and counted; malformed rows are skipped, counted, and
the first few are reported with their file:line. Bytes that are not UTF-8 stop the stage at their
file:line:column: a wrongly encoded file is one to re-save, not rows to drop.
"""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from zagreus.data.sources import open_binary
from zagreus.errors import UserError, decode_utf8, read_json
from zagreus.post.chat import validate_messages

log = logging.getLogger(__name__)

MAX_WARNINGS = 3
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                   "function_call": "assistant", "observation": "tool", "user": "user", "assistant": "assistant"}


@dataclass
class ChatExample:
    """One SFT conversation (validated), with the tool schemas it was given."""

    messages: list[dict]
    tools: list[dict] | None = None
    where: str = ""


@dataclass
class PreferenceExample:
    """A prompt conversation and two assistant continuations."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    tools: list[dict] | None = None
    where: str = ""


@dataclass
class LoadStats:
    """What happened to the rows of one dataset, for the log and the run summary."""

    name: str
    rows: int = 0
    kept: int = 0
    no_assistant: int = 0
    malformed: int = 0
    first_problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "skipped_no_assistant": self.no_assistant,
                "skipped_malformed": self.malformed, "first_problems": self.first_problems}

    def count(self, outcome: Any) -> Any:
        """Count one row's `row_outcome`; returns the example, or None for a skipped row."""
        self.rows += 1
        if isinstance(outcome, Malformed):
            self.malformed += 1
            if len(self.first_problems) < MAX_WARNINGS:
                self.first_problems.append(str(outcome))
            return None
        if outcome is NO_ASSISTANT:
            self.no_assistant += 1
            return None
        self.kept += 1
        return outcome

    def report(self) -> None:
        """Log what was skipped; UserError when no row was usable."""
        if self.malformed:
            shown = "; ".join(self.first_problems)
            log.warning("dataset %s: %d malformed row(s) skipped, first: %s", self.name, self.malformed, shown)
        log.info("dataset %s: %d rows, %d kept, %d without an assistant turn skipped, %d malformed skipped",
                 self.name, self.rows, self.kept, self.no_assistant, self.malformed)
        if not self.kept:
            raise UserError(f"dataset {self.name}: no usable rows ({self.rows} read, {self.no_assistant} without an "
                            f"assistant turn, {self.malformed} malformed"
                            f"{': ' + self.first_problems[0] if self.first_problems else ''})")


class _Skip(Exception):
    """A row without an assistant turn: counted, not an error."""


# --- reading rows ---------------------------------------------------------------------------
def _local_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, row) for jsonl/json/parquet; an unparsable line yields (where, exception)."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix
    if suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        with open_binary(path) as f:
            for line_no, raw in enumerate(f, 1):
                line = decode_utf8(raw, path, first_line=line_no)
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{line_no}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{path}:{line_no}", ValueError(f"not valid JSON ({exc.msg})")
    elif suffix == ".json":
        data = read_json(path, expect=list, fix="a .json dataset is a list of rows; use .jsonl for one row per line")
        for i, row in enumerate(data):
            yield f"{path}:[{i}]", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # only parquet datasets need pyarrow

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: cannot read as parquet ({exc})") from None
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1
    else:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json or .parquet")


def _hub_rows(hub: str, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets  # seconds to import, and only hub datasets need it
    except ImportError:  # pragma: no cover - a dependency
        raise UserError("hub datasets need the package datasets: pip install datasets") from None
    try:
        ds = datasets.load_dataset(hub, config, split=split, streaming=True)
    except Exception as exc:  # network, authentication, unknown name: all user-fixable
        raise UserError(f"hub dataset {hub} ({config or 'default'}, {split}): cannot open ({str(exc).splitlines()[0]}); "
                        "check the name and your network, or download it and use path:") from None
    for i, row in enumerate(ds):
        yield f"{hub}[{split}][{i}]", row


def dataset_files(spec, resolve_path) -> list[Path]:
    """The local files of one recipe dataset (`ChatDataset` with path:), in reading order: each
    pattern's matches sorted, a folder's dataset files within it."""
    out: list[Path] = []
    for pattern in spec.paths():
        files = sorted(glob.glob(str(resolve_path(pattern))))
        if not files:
            raise UserError(f"dataset path {pattern}: no file matches; fix the path in the recipe")
        for f in map(Path, files):
            if f.is_dir():
                out += [inner for inner in sorted(f.rglob("*")) if inner.is_file() and (
                    inner.suffix in (".jsonl", ".json", ".parquet") or inner.name.endswith((".jsonl.gz", ".jsonl.zst")))]
            else:
                out.append(f)
    return out


def dataset_rows(spec, resolve_path) -> Iterator[tuple[str, Any]]:
    """Rows of one recipe dataset (`ChatDataset`), local paths resolved by `resolve_path`."""
    if spec.hub is not None:
        yield from _hub_rows(spec.hub, spec.config, spec.split)
        return
    for f in dataset_files(spec, resolve_path):
        yield from _local_rows(f)


# --- normalising rows -----------------------------------------------------------------------
def detect_format(row: dict) -> str:
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "conversation" in row or "conversations" in row:
        return "conversation"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise ValueError(f"cannot tell the format from the columns {sorted(row)}; set format: in the recipe "
                     "(messages, conversation, prompt_completion, preference)")


def _maybe_json(value: Any, what: str) -> Any:
    """Hub datasets often store nested lists as JSON strings."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{what} looks like JSON but does not parse") from None
    return value


def _tools_of(row: dict) -> list[dict] | None:
    tools = _maybe_json(row.get("tools"), "tools")
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of JSON schemas (objects)")
    return tools


def _as_messages(value: Any, what: str, default_role: str) -> list[dict]:
    """A string becomes one message of `default_role`; a list is taken as messages."""
    value = _maybe_json(value, what)
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return [_from_sharegpt(m) for m in value]
    raise ValueError(f"{what} must be a string or a list of messages, got {type(value).__name__}")


def _from_sharegpt(msg: Any) -> Any:
    if isinstance(msg, dict) and "role" not in msg and "from" in msg:
        role = _SHAREGPT_ROLES.get(str(msg["from"]).lower(), msg["from"])
        content = msg.get("value")
        if role == "tool" and isinstance(content, str):
            # Hermes data wraps results itself; the template adds the wrapper, so drop this one.
            inner = content.strip()
            if inner.startswith("<tool_response>") and inner.endswith("</tool_response>"):
                content = inner[len("<tool_response>"):-len("</tool_response>")].strip("\n")
        return {"role": role, "content": content}
    return msg


def _has_assistant(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def chat_example(row: Any, fmt: str, where: str) -> ChatExample:
    """One SFT row as a validated conversation. ValueError: malformed; _Skip: no assistant turn."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        messages = _as_messages(row.get("messages"), "messages", "user")
    elif fmt == "conversation":
        key = "conversation" if "conversation" in row else "conversations"
        messages = _as_messages(row.get(key), key, "user")
    elif fmt == "prompt_completion":
        if "prompt" not in row or "completion" not in row:
            raise ValueError("prompt_completion rows need 'prompt' and 'completion'")
        messages = _as_messages(row["prompt"], "prompt", "user") + _as_messages(row["completion"], "completion", "assistant")
    elif fmt == "preference":
        raise ValueError("preference rows (prompt/chosen/rejected) are for dpo:, not sft:")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if "system" in row and isinstance(row["system"], str) and row["system"] and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": row["system"]}] + messages
    messages = validate_messages(messages)
    if not _has_assistant(messages):
        raise _Skip()
    return ChatExample(messages, _tools_of(row), where)


def preference_example(row: Any, where: str) -> PreferenceExample:
    """One DPO row. chosen/rejected keep only what follows the prompt."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"preference rows need '{key}'")
    chosen = _as_messages(row["chosen"], "chosen", "assistant")
    rejected = _as_messages(row["rejected"], "rejected", "assistant")
    if row.get("prompt") is not None:
        prompt = _as_messages(row["prompt"], "prompt", "user")
    else:
        # No prompt column (Anthropic HH style): the prompt is the shared part up to the last one.
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
    if "system" in row and isinstance(row["system"], str) and row["system"] and prompt and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": row["system"]}] + prompt
    prompt = validate_messages(prompt)
    chosen = _strip_prompt(validate_messages(chosen), prompt)
    rejected = _strip_prompt(validate_messages(rejected), prompt)
    if not _has_assistant(chosen) or not _has_assistant(rejected):
        raise _Skip()
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return PreferenceExample(prompt, chosen, rejected, _tools_of(row), where)


def _strip_prompt(messages: list[dict], prompt: list[dict]) -> list[dict]:
    if messages[: len(prompt)] == prompt:
        return messages[len(prompt):]
    # A system message may sit only in the prompt (UltraFeedback-style chosen lists omit it).
    if prompt and prompt[0]["role"] == "system" and messages[: len(prompt) - 1] == prompt[1:]:
        return messages[len(prompt) - 1:]
    return messages


class Malformed(str):
    """The outcome of a malformed row: "file:line: what is wrong"."""


NO_ASSISTANT = "no assistant turn"  # the outcome of a row without an assistant turn


def dataset_name(spec) -> str:
    return spec.name or spec.hub or ", ".join(spec.paths())


def row_outcome(row: Any, where: str, fmt: str, kind: str) -> Any:
    """One row read by `dataset_rows`, normalised for `kind` ('sft' or 'dpo'): a ChatExample or
    PreferenceExample, NO_ASSISTANT, or a Malformed problem. Never raises for a bad row."""
    try:
        if isinstance(row, Exception):
            raise row
        if kind == "sft":
            return chat_example(row, fmt, where)
        if fmt not in ("auto", "preference"):
            raise ValueError(f"dpo datasets need format preference (prompt/chosen/rejected), not {fmt}")
        return preference_example(row, where)
    except _Skip:
        return NO_ASSISTANT
    except (ValueError, TypeError, KeyError) as exc:
        return Malformed(f"{where}: {exc}")


def summarize(stats: list[LoadStats]) -> dict:
    total = Counter()
    for s in stats:
        total.update({"rows": s.rows, "kept": s.kept, "skipped_no_assistant": s.no_assistant, "skipped_malformed": s.malformed})
    return {"total": dict(total), "datasets": {s.name: s.as_dict() for s in stats}}
