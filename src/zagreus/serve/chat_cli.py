"""`zagreus chat`: an interactive terminal chat that streams the model's replies.

Reads one user message per line from stdin (a terminal or a pipe), renders the conversation
with the model's template, streams the reply token by token until the end-of-turn token, and
prints tool calls as structured calls. Commands: /reset (forget the conversation, keep the
system prompt), /tool TEXT (answer the last tool call with a tool result), /exit.
When the conversation outgrows the context, the oldest turns after the system prompt are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable, TextIO

from zagreus.model.generate import generate_stream
from zagreus.post.chat import parse_tool_calls
from zagreus.serve.engine import ContextOverflow, Engine, TextStream

HELP = "commands: /reset clears the conversation, /tool TEXT sends a tool result, /exit quits"


def format_call(call: dict) -> str:
    return f"[tool call] {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"


def reply(engine: Engine, messages: list[dict], tools: list[dict] | None, params, write: Callable[[str], None]) -> dict:
    """Stream one assistant turn through `write`; return it as a message (tool calls structured)."""
    prompt = engine.render_chat(messages, tools=tools, truncate=True)
    # generate_stream clips max_new_tokens to the room left in the context itself.
    params = dataclasses.replace(params, stop_ids=tuple(engine.stop_ids))
    text = TextStream(engine.tokenizer)
    try:
        for token in generate_stream(engine.model, prompt, params):
            write(text.push(token))
    except KeyboardInterrupt:  # Ctrl-C cuts the reply short but keeps the session
        write(text.flush() + " [interrupted]\n")
        return {"role": "assistant", "content": text.text}
    content, calls = parse_tool_calls(text.finish())
    if not calls:
        write(text.flush() + "\n")
        return {"role": "assistant", "content": text.text}
    write("\n" + "".join(format_call(c) + "\n" for c in calls))
    return {"role": "assistant", "content": content, "tool_calls": calls}


def chat_loop(engine: Engine, params, read: Callable[[], str], write: Callable[[str], None],
              system: str | None = None, tools: list[dict] | None = None) -> None:
    """Run turns until /exit or end of input. `read` returns '' at end of input."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        line = read()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(start)
            write("(conversation reset)\n")
            continue
        if line.startswith("/tool "):
            messages.append({"role": "tool", "content": line[len("/tool "):]})
        elif line.startswith("/"):
            write(HELP + "\n")
            continue
        else:
            messages.append({"role": "user", "content": line})
        try:
            messages.append(reply(engine, messages, tools, params, write))
        except ContextOverflow as exc:  # even the last message alone is too long: say so, keep going
            messages.pop()
            write(f"error: {exc}\n")


def run(engine: Engine, params, stdin: TextIO, stdout: TextIO, system: str | None = None,
        tools: list[dict] | None = None) -> None:
    """The terminal front end: a prompt on a TTY, plain lines on a pipe."""
    interactive = stdin.isatty() and stdin is sys.stdin

    def read() -> str:
        if not interactive:
            return stdin.readline()
        try:
            return input("> ") + "\n"  # with readline's line editing and history
        except EOFError:
            return ""

    def write(text: str) -> None:
        if text:
            stdout.write(text)
            stdout.flush()

    if interactive:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing)
        except ImportError:
            pass
        write(f"chatting with {engine.name} ({engine.template}, context {engine.context_length}); {HELP}\n")
    chat_loop(engine, params, read, write, system=system, tools=tools)
