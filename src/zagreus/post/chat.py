"""Chat templates: rendering conversations to token ids with the assistant-loss mask, the same
templates as Jinja `chat_template` strings for Hugging Face exports, which template a model
folder was trained with (`template_of`), and tool-call parsing.

Two templates:
- "chatml": `<|im_start|>role\\n...<|im_end|>\\n`, tools Hermes-style (JSON schemas listed in the
  system turn inside `<tools></tools>`, calls as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`,
  results as a `tool` turn wrapped in `<tool_response>\\n...\\n</tool_response>`).
- "llama3": `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`, with the same Hermes-style
  tool block and calls; tool results go in an `ipython` turn, as in Llama-3.1.
Both start with `<|begin_of_text|>`.

Token ids equal those of transformers' `apply_chat_template` on the Jinja string: the text
between two special tokens is encoded in one piece, which is what a Hugging Face tokenizer does
after splitting on its added tokens. One deliberate difference: special-token strings inside
message content are encoded as plain text here (a user cannot inject `<|im_end|>`); transformers
does the same only with `sanitize_control_tokens=True`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zagreus.errors import UserError, read_json

TEMPLATES = ("chatml", "llama3")
ROLES = ("system", "user", "assistant", "tool")

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# Role markers of each template: (special before role, text after role up to content, end of turn).
_MARKERS = {
    "chatml": {"start": "<|im_start|>", "after_role": "\n", "end": "<|im_end|>", "glue": "\n"},
    "llama3": {"start": "<|start_header_id|>", "after_role": "<|end_header_id|>\n\n", "end": "<|eot_id|>", "glue": ""},
}
_TOOL_ROLE = {"chatml": "tool", "llama3": "ipython"}


@dataclass
class RenderedChat:
    """Token ids of a rendered conversation; assistant_mask is True where the model is trained."""

    ids: list[int] = field(default_factory=list)
    assistant_mask: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


# --- validation -----------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str | None:
    """Message content as one string; OpenAI-style lists of text parts are joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ValueError(f"{where}: content part {j} is not a text part {{'type': 'text', 'text': ...}}")
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")


def _normalize_call(call: Any, where: str) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be an object with name and arguments")
    fn = call.get("function", call)  # OpenAI nests the call under "function"
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}: a tool call needs a non-empty string 'name'")
    args = fn.get("arguments", {})
    parsed = args
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: tool call '{fn['name']}' has arguments that are not valid JSON ({exc.msg})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}: tool call '{fn['name']}' arguments must be a JSON object")
    # A JSON string is kept verbatim: the Jinja template prints it as given.
    return {"name": fn["name"], "arguments": args}


def validate_messages(messages: Any) -> list[dict]:
    """Check a conversation and return it normalised (string content, tool calls as {name, arguments}).

    Raises ValueError naming the message and the problem: unknown role, missing or non-text
    content, a system message that is not first, malformed tool calls.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(messages):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: expected an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role == "ipython":  # Llama-3.1's name for tool results
            role = "tool"
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: a system message is only allowed first")
        content = _text_of(msg.get("content"), where)
        calls = msg.get("tool_calls") or []
        if calls and role != "assistant":
            raise ValueError(f"{where}: only assistant messages may carry tool_calls")
        if not isinstance(calls, list):
            raise ValueError(f"{where}: tool_calls must be a list")
        calls = [_normalize_call(c, f"{where}, tool call {j}") for j, c in enumerate(calls)]
        if content is None and not calls:
            raise ValueError(f"{where}: missing 'content' (a string)")
        norm = {"role": role, "content": content if content is not None else ""}
        if calls:
            norm["tool_calls"] = calls
        out.append(norm)
    return out


# --- rendering ------------------------------------------------------------------------------
def format_tool_call(call: dict) -> str:
    """One call as the assistant writes it; matches the Jinja template's `tojson` output."""
    args = call["arguments"]
    args_json = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return '<tool_call>\n{"name": ' + json.dumps(call["name"], ensure_ascii=False) + ', "arguments": ' + args_json + "}\n</tool_call>"


def _system_text(system: str | None, tools: list[dict] | None) -> str | None:
    if not tools:
        return system
    listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    head = f"{system}\n\n" if system else ""
    return head + TOOLS_PREAMBLE + listed + TOOLS_POSTAMBLE


# A rendered piece: (text, is_special_token, trained).
Piece = tuple[str, bool, bool]


def render_pieces(messages: list[dict], template: str, tools: list[dict] | None, add_generation_prompt: bool) -> list[Piece]:
    """The conversation as special tokens and text pieces, each marked trained or not."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
    m = _MARKERS[template]
    pieces: list[Piece] = [("<|begin_of_text|>", True, False)]

    def turn(role: str, body: str, trained: bool = False) -> None:
        pieces.append((m["start"], True, False))
        if template == "llama3":
            pieces.extend([(role, False, False), ("<|end_header_id|>", True, False), ("\n\n", False, False)])
        else:
            pieces.append((role + "\n", False, False))
        if body:
            pieces.append((body, False, trained))
        pieces.append((m["end"], True, trained))
        if m["glue"]:
            pieces.append((m["glue"], False, False))

    messages = validate_messages(messages)
    first_system = messages[0]["content"] if messages[0]["role"] == "system" else None
    system = _system_text(first_system, tools)
    if system is not None:
        turn("system", system)
    for msg in messages:
        role = msg["role"]
        if role == "system":
            continue
        if role == "assistant":
            body = msg["content"]
            for j, call in enumerate(msg.get("tool_calls", [])):
                if body or j > 0:
                    body += "\n"
                body += format_tool_call(call)
            turn("assistant", body, trained=True)
        elif role == "tool":
            body = msg["content"]
            if template == "chatml":
                body = "<tool_response>\n" + body + "\n</tool_response>"
            turn(_TOOL_ROLE[template], body)
        else:
            turn(role, msg["content"])
    if add_generation_prompt:
        pieces.append((m["start"], True, False))
        if template == "llama3":
            pieces += [("assistant", False, False), ("<|end_header_id|>", True, False), ("\n\n", False, False)]
        else:
            pieces.append(("assistant\n", False, False))
    return pieces


def render(messages: list[dict], tokenizer, template: str = "chatml", tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids and the assistant mask (assistant content, tool calls and their end-of-turn token)."""
    pieces = render_pieces(messages, template, tools, add_generation_prompt)
    out = RenderedChat()
    chunk: list[Piece] = []

    def flush() -> None:
        if chunk:
            ids, mask = _encode_chunk(chunk, tokenizer)
            out.ids += ids
            out.assistant_mask += mask
            chunk.clear()

    for piece in pieces:
        text, special, trained = piece
        if special:
            flush()
            out.ids.append(_special_id(tokenizer, text))
            out.assistant_mask.append(trained)
        else:
            chunk.append(piece)
    flush()
    return out


def _special_id(tokenizer, token: str) -> int:
    if token not in tokenizer.special_tokens:
        raise ValueError(f"tokenizer {tokenizer.name} has no special token {token}; use a tokenizer made by zagreus")
    return tokenizer.special_tokens[token]


def _encode_chunk(chunk: list[Piece], tokenizer) -> tuple[list[int], list[bool]]:
    """Encode the text between two special tokens in one piece (as Hugging Face does) and mark the
    tokens of its trained tail; a token straddling the untrained/trained boundary counts as trained."""
    text = "".join(p[0] for p in chunk)
    ids = tokenizer.encode(text)
    head = ""
    for i, (piece, _, trained) in enumerate(chunk):
        if trained:
            if not all(p[2] for p in chunk[i:]):
                raise AssertionError("a trained piece is followed by an untrained one without a special token between")
            break
        head += piece
    else:
        return ids, [False] * len(ids)
    head_ids = tokenizer.encode(head) if head else []
    split = 0
    while split < min(len(head_ids), len(ids)) and head_ids[split] == ids[split]:
        split += 1
    # Usually the head's tokens are a prefix of the chunk's; when pre-tokenization merged across
    # the boundary (content starting with a newline) the first differing token holds content.
    return ids, [i >= split for i in range(len(ids))]


# --- Jinja templates ------------------------------------------------------------------------
def _jinja_str(s: str) -> str:
    """A Python string as a Jinja string literal."""
    return json.dumps(s)


def jinja_template(template: str) -> str:
    """The Jinja chat_template of tokenizer_config.json that renders exactly as `render`."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
    m = _MARKERS[template]
    if template == "llama3":
        def header(role_expr: str) -> str:
            return f"{{{{- '<|start_header_id|>' + {role_expr} + '<|end_header_id|>\\n\\n' }}}}"
    else:
        def header(role_expr: str) -> str:
            return f"{{{{- '<|im_start|>' + {role_expr} + '\\n' }}}}"
    end = f"{{{{- {_jinja_str(m['end'] + m['glue'])} }}}}"
    tool_body = (
        "'<tool_response>\\n' + message['content'] + '\\n</tool_response>'" if template == "chatml" else "message['content']"
    )
    return (
        "{{- bos_token }}"
        "{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- else %}{%- set system = none %}{%- endif %}"
        "{%- if tools %}"
        + header("'system'")
        + "{%- if system %}{{- system + '\\n\\n' }}{%- endif %}"
        + f"{{{{- {_jinja_str(TOOLS_PREAMBLE)} }}}}"
        "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
        + f"{{{{- {_jinja_str(TOOLS_POSTAMBLE)} }}}}"
        + end
        + "{%- elif system is not none %}"
        + header("'system'")
        + "{{- system }}"
        + end
        + "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}"
        "{%- elif message['role'] == 'assistant' %}"
        + header("'assistant'")
        + "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
        "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
        "{%- for call in message['tool_calls'] %}"
        "{%- if call['function'] is defined %}{%- set call = call['function'] %}{%- endif %}"
        "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
        "{{- '<tool_call>\\n{\"name\": ' + (call['name'] | tojson) + ', \"arguments\": ' }}"
        "{%- if call['arguments'] is string %}{{- call['arguments'] }}{%- else %}{{- call['arguments'] | tojson }}{%- endif %}"
        "{{- '}\\n</tool_call>' }}"
        "{%- endfor %}"
        "{%- endif %}"
        + end
        + "{%- elif message['role'] == 'tool' or message['role'] == 'ipython' %}"
        + header(_jinja_str(_TOOL_ROLE[template]))
        + f"{{{{- {tool_body} }}}}"
        + end
        + "{%- else %}"
        + header("message['role']")
        + "{{- message['content'] }}"
        + end
        + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        + header("'assistant'")
        + "{%- endif %}"
    )


def saved_chat_template(folder: str | Path) -> str | None:
    """The Jinja chat_template a saved model's tokenizer_config.json carries, if any."""
    cfg = Path(folder) / "tokenizer_config.json"
    return read_json(cfg).get("chat_template") if cfg.is_file() else None


def template_of(folder: Path, explicit: str | None) -> str:
    """The template a model was trained with: the flag, else the one recorded by post-training
    (zagreus.json), else the export's chat_template, else ChatML."""
    if explicit:
        if explicit not in TEMPLATES:
            raise UserError(f"--template {explicit}: choose one of {', '.join(TEMPLATES)}")
        return explicit
    record = Path(folder) / "zagreus.json"
    if record.is_file():
        recorded = read_json(record).get("template")
        if recorded in TEMPLATES:
            return recorded
    saved = saved_chat_template(folder)
    if not saved:
        return "chatml"
    for name in TEMPLATES:
        if saved == jinja_template(name):
            return name
    # A template written elsewhere: recognise the format by its markers.
    if "<|start_header_id|>" in saved:
        return "llama3"
    if "<|im_start|>" in saved:
        return "chatml"
    raise UserError(f"{Path(folder) / 'tokenizer_config.json'}: chat_template is neither ChatML nor Llama-3; "
                    f"pass --template chatml|llama3")


# --- generation helpers ---------------------------------------------------------------------
def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Ids that end an assistant turn: the template's end-of-turn token and end-of-text."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
    stops = [_special_id(tokenizer, _MARKERS[template]["end"]), tokenizer.eos_id]
    if template == "llama3" and "<|eom_id|>" in tokenizer.special_tokens:
        stops.append(tokenizer.special_tokens["<|eom_id|>"])
    return stops


_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split generated text into its prose and the calls in `<tool_call>` blocks.

    A block whose body is not a JSON object with a string "name" stays in the prose, so a
    malformed call is shown to the user rather than silently dropped.
    """
    calls: list[dict] = []
    kept: list[str] = []
    last = 0
    for match in _CALL_RE.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        calls.append({"name": obj["name"], "arguments": args})
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls
