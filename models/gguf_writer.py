"""A writer of GGUF v3 files (little-endian), the mirror image of gguf.py's reader: the same layout, types
and alignment rules, so that what `write_gguf` writes, `GGUFFile` (and llama.cpp) reads back.

    magic b"GGUF" | version 3 u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type u32, value)
    tensor_count x  (name: string, n_dims u32, ne: n_dims x u64, ggml_type u32, offset u64)
    padding to the alignment, then the data section: each tensor at a multiple of the alignment

Metadata value types follow the Python type, as the gguf package's GGUFValueType.get_type does: bool ->
BOOL, int -> INT32 (INT64 / UINT64 when it does not fit), float -> FLOAT32, str -> STRING, list / tuple ->
ARRAY of the items' type. llama.cpp reads most keys with one exact type (gguf_get_val_u32 / _f32 assert it),
so a key it reads as uint32 (e.g. general.alignment, general.file_type) is given as `Typed(UINT32, value)`;
`Typed(t, [..])` is an array of t.
"""
from __future__ import annotations

import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .gguf import (
    _FIXED,
    ARRAY,
    BOOL,
    DEFAULT_ALIGNMENT,
    FLOAT32,
    INT32,
    INT64,
    MAGIC,
    MAX_DIMS,
    MAX_NESTING,
    STRING,
    UINT32,
    UINT64,
)

VERSION = 3
MAX_NAME_BYTES = 63  # GGML_MAX_NAME 64 with the terminator: gguf.cpp refuses a longer tensor name
GGML_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}  # F32, F16, BF16 (ggml.h's ggml_type)
_INT_RANGES = ((INT32, -(2**31), 2**31), (INT64, -(2**63), 2**63), (UINT64, 0, 2**64))


class GGUFWriteError(ValueError):
    """Metadata or a tensor that a GGUF file cannot hold; the message names the key or tensor."""


@dataclass(frozen=True)
class Typed:
    """A metadata value with its GGUF type forced: Typed(UINT32, 4), Typed(FLOAT64, 0.1); for a list, the type
    of its items: Typed(UINT32, [1, 2]) is an array of uint32."""

    value_type: int
    value: object


def write_gguf(path, metadata: Mapping[str, object], tensors: Mapping[str, torch.Tensor],
               alignment: int = DEFAULT_ALIGNMENT) -> Path:
    """Write a GGUF v3 file: `metadata` key -> value (or Typed), `tensors` name -> F32 / F16 / BF16 tensor, in
    the given order. The file appears whole or not at all (written beside it, then renamed). -> path."""
    if alignment <= 0 or alignment & (alignment - 1):  # the reader's (and gguf.cpp's) rule
        raise GGUFWriteError(f"alignment {alignment} is not a power of two")
    if sys.byteorder != "little":  # tensor bytes are written as the host stores them
        raise GGUFWriteError("GGUF files are written little-endian; this host is big-endian")
    path = Path(path)
    entries = _with_alignment(dict(metadata), alignment)
    datas = [(name, _tensor_bytes(name, t)) for name, t in tensors.items()]
    head = [MAGIC, struct.pack("<IQQ", VERSION, len(datas), len(entries))]
    head += [_string(key, "metadata key") + _value(value, key) for key, value in entries.items()]
    offset = 0
    for (name, (ne, ggml_type, data)) in datas:
        head.append(_string(name, "tensor name") + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset))
        offset += _padded(len(data), alignment)
    header = b"".join(head)
    tmp = path.with_name(f".{path.name}.partial")  # open(), not mkstemp: the file gets the umask's mode
    try:
        with open(tmp, "wb") as f:
            f.write(header + bytes(_padded(len(header), alignment) - len(header)))
            for _, (_, _, data) in datas:  # each padded to the alignment, the last too (as gguf.cpp writes)
                f.write(data + bytes(_padded(len(data), alignment) - len(data)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _with_alignment(metadata: dict, alignment: int) -> dict:
    """general.alignment, when set or not the default, as the uint32 the reader (and llama.cpp) insist on."""
    given = metadata.get("general.alignment")
    if given is not None:
        value = given.value if isinstance(given, Typed) else given
        if value != alignment or isinstance(given, Typed) and given.value_type != UINT32:
            raise GGUFWriteError(f"general.alignment {given!r} disagrees with alignment={alignment} (uint32)")
    if given is not None or alignment != DEFAULT_ALIGNMENT:
        metadata["general.alignment"] = Typed(UINT32, alignment)
    return metadata


def _tensor_bytes(name: str, tensor: torch.Tensor) -> tuple[list[int], int, bytes]:
    """-> (ne: the shape reversed, ne[0] the row length; the GGML type; the bytes, row-major)."""
    if tensor.dtype not in GGML_TYPES:
        raise GGUFWriteError(f"tensor {name!r} is {tensor.dtype}; GGUF F32 / F16 / BF16 tensors are float32, "
                             "float16 or bfloat16: convert it first")
    if not 1 <= tensor.dim() <= MAX_DIMS:
        raise GGUFWriteError(f"tensor {name!r} has {tensor.dim()} dims; GGUF tensors have 1 to {MAX_DIMS}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return list(reversed(tensor.shape)), GGML_TYPES[tensor.dtype], flat.view(torch.uint8).numpy().tobytes()


def _string(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise GGUFWriteError(f"{what} {text!r} is a {type(text).__name__}, not a str")
    data = text.encode("utf-8")
    if what == "tensor name" and len(data) > MAX_NAME_BYTES:
        raise GGUFWriteError(f"tensor name {text!r} is {len(data)} bytes; llama.cpp takes at most {MAX_NAME_BYTES}")
    return struct.pack("<Q", len(data)) + data


def _value(value, key: str) -> bytes:
    """value_type u32 + the value: the type forced by Typed, else the Python type's."""
    if isinstance(value, Typed):
        if isinstance(value.value, (list, tuple)):
            return struct.pack("<I", ARRAY) + _array(value.value, key, value.value_type, 1)
        return struct.pack("<I", value.value_type) + _scalar(value.value_type, value.value, key)
    vtype = _type_of(value, key)
    body = _array(value, key, None, 1) if vtype == ARRAY else _scalar(vtype, value, key)
    return struct.pack("<I", vtype) + body


def _type_of(value, what: str) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        for vtype, low, high in _INT_RANGES:
            if low <= value < high:
                return vtype
        raise GGUFWriteError(f"{what}: {value} fits no GGUF integer type")
    if isinstance(value, float):
        return FLOAT32
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple)):
        return ARRAY
    raise GGUFWriteError(f"{what}: a {type(value).__name__} has no GGUF type (bool, int, float, str, list)")


def _array_type(items, what: str) -> int:
    """The one item type of an untyped list; ints take the narrowest integer type that holds them all."""
    if not items:
        raise GGUFWriteError(f"{what}: an empty list has no item type; give it as Typed(<item type>, [])")
    types = {_type_of(item, what) for item in items}
    if types <= {vtype for vtype, _, _ in _INT_RANGES}:
        return next(vtype for vtype, low, high in _INT_RANGES if all(low <= item < high for item in items))
    if len(types) > 1:
        raise GGUFWriteError(f"{what}: a list mixes item types {sorted(types)}; give it as Typed(<item type>, [...])")
    return types.pop()


def _array(items, what: str, item_type: int | None, depth: int) -> bytes:
    if depth > MAX_NESTING:  # the reader refuses deeper nesting
        raise GGUFWriteError(f"{what}: arrays nested deeper than {MAX_NESTING} levels")
    item_type = _array_type(items, what) if item_type is None else item_type
    head = struct.pack("<IQ", item_type, len(items))
    if item_type == ARRAY:
        return head + b"".join(_array(item, f"{what}[{i}]", None, depth + 1) for i, item in enumerate(items))
    if item_type in _FIXED:  # one struct call for the whole run
        _check_kinds(item_type, items, what)
        try:
            return head + struct.pack(f"<{len(items)}{_FIXED[item_type]}", *items)
        except struct.error as e:
            raise GGUFWriteError(f"{what}: an item does not fit item type {item_type} ({e})") from None
    return head + b"".join(_scalar(item_type, item, f"{what}[{i}]") for i, item in enumerate(items))


def _scalar(vtype: int, value, what: str) -> bytes:
    if vtype == STRING:
        return _string(value, what)
    if vtype not in _FIXED:
        raise GGUFWriteError(f"{what}: value type {vtype} is not a scalar GGUF type (0-12 but 9, ARRAY)")
    _check_kinds(vtype, [value], what)
    try:
        return struct.pack(f"<{_FIXED[vtype]}", value)
    except struct.error as e:
        raise GGUFWriteError(f"{what}: {value!r} does not fit value type {vtype} ({e})") from None


def _check_kinds(vtype: int, values, what: str) -> None:
    """bool for BOOL, int for the integer types, int or float for the float ones: struct alone would write
    True as 1 and 2.0 as a BOOL byte."""
    if vtype == BOOL:
        ok = all(isinstance(v, bool) for v in values)
    elif _FIXED[vtype] in "fd":
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    else:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ok:
        raise GGUFWriteError(f"{what}: {values[:4]!r} is not of value type {vtype}")

