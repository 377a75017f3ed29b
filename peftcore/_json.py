"""The text and JSON files peftcore reads (data, label lists, adapter folders, run folders) and writes.

Reading: files someone else wrote, maybe with a Windows editor's byte-order mark; a byte that is not
UTF-8 or a JSON syntax error is a one-line error at its file:line, not a decoder traceback.
Writing: strict JSON. NaN and inf are not JSON, and `json.dumps` writes them as bare NaN / Infinity
tokens that other languages' parsers reject.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_text(path: Path, name: str | None = None, error: type[Exception] = ValueError) -> str:
    """The file as UTF-8 text, a byte-order mark dropped. A byte that is not UTF-8 is an `error` at its
    `name:line` (default name: the path): the decoder alone only tells a byte offset."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        # the bytes before the first bad one decode: the column counts characters, as an editor does
        line, column = raw.count(b"\n", 0, e.start) + 1, len(raw[line_start : e.start].decode("utf-8-sig")) + 1
        raise error(f"{name or path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}): "
                    "save the file as UTF-8") from None


def read_json(path: Path, error: type[Exception] = ValueError):
    """The file's JSON value; bad UTF-8 or bad JSON is an `error` at path:line[:column]."""
    try:
        return json.loads(read_text(path, error=error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict:
    data = read_json(path, error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def json_safe(value):
    """NaN / inf -> None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
