"""The one exception type for mistakes a user can fix; the CLI prints it as a single line.

Also the readers of the small files a user hands over (recipes, configs, chat data), which turn
bytes that are not UTF-8 or not JSON into that one line, naming file:line:column.
"""

from __future__ import annotations

import json
from pathlib import Path


class UserError(Exception):
    """A problem in the user's input (recipe, file, flag), with the message telling the fix."""


UTF8_FIX = "save the file as UTF-8"
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def decode_utf8(data: bytes, where: str | Path, first_line: int = 1, fix: str = UTF8_FIX) -> str:
    """`data` (the bytes of `where` from line `first_line` on) as text; invalid UTF-8 is a UserError at where:line:column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{where}:{line}:{column}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); {fix}") from None


def read_json(path: Path, expect: type = dict, fix: str = "") -> dict | list:
    """A JSON file that must hold an `expect` (dict or list); a damaged one is a UserError naming path:line:column.

    fix: what the user should do about a damaged file, appended to the message.
    """
    hint = f"; {fix}" if fix else ""
    try:
        value = json.loads(decode_utf8(Path(path).read_bytes(), path, fix=fix or UTF8_FIX))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}){hint}") from None
    if not isinstance(value, expect):
        raise UserError(f"{path}: expected a JSON {_JSON_TYPES[expect].split()[-1]}, found {_JSON_TYPES[type(value)]}{hint}")
    return value
