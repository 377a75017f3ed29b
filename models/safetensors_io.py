"""Reading and writing safetensors files one tensor at a time.

Why not `safe_open`: its memory map stays open for the whole load and every page it touches is
charged to the process' RSS, so loading a checkpoint costs two copies of it. Reading each tensor
straight into its final storage with `readinto` costs one copy plus the header.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Bytes per element of every whole-byte dtype the format defines: the header checks need the size of
# dtypes peftcore cannot make tensors of too (inspect-model describes an FP8 checkpoint it cannot load).
ITEM_SIZES = {**{name: dtype.itemsize for name, dtype in DTYPES.items()},
              "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: Path) -> tuple[dict, int]:
    """-> ({name: {"dtype", "shape", "data_offsets"}}, byte offset where tensor data starts).

    Every entry is checked against the format and the file's size, so a reader of the header alone
    (inspect-model) sees a truncated or hand-damaged file as such, and every later read can trust it."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = os.fstat(f.fileno()).st_size
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size  # too short: fails below
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (its 8-byte header length does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is a JSON {json_kind(header)}, not an object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        check_entry(path, name, info, size - 8 - n)
    return header, 8 + n


def json_kind(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def int_list(value) -> bool:
    return isinstance(value, list) and all(type(x) is int for x in value)  # bool is not a dimension


def entry_problem(info) -> str | None:
    """What is wrong with one tensor's header entry by itself (None: nothing)."""
    if not isinstance(info, dict):
        return f"has a header entry of {type(info).__name__}, not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEM_SIZES:
        return f"has dtype {dtype!r}, which is not a safetensors dtype ({', '.join(ITEM_SIZES)})"
    if not int_list(shape) or any(d < 0 for d in shape):
        return f"has shape {shape!r}; a shape is a list of integers >= 0"
    if not int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        return f"has data_offsets {offsets!r}; expected [start, end] with 0 <= start <= end"
    need = math.prod(shape) * ITEM_SIZES[dtype]
    if offsets[1] - offsets[0] != need:
        return f"spans {offsets[1] - offsets[0]} bytes but its shape and dtype need {need}"
    return None


def check_entry(path: Path, name: str, info, data_size: int) -> None:
    """One entry against the format, then its data range against the bytes the file holds."""
    problem = entry_problem(info)
    if problem:
        raise ValueError(f"{path}: tensor {name!r} {problem}")
    start, end = info["data_offsets"]
    if end > data_size:
        raise ValueError(f"{path} is truncated: tensor {name!r} needs {end - start} bytes, "
                         f"found {max(0, data_size - start)}")


def read_exactly(f, buffer: memoryview, path: Path, name: str) -> None:
    """Fill `buffer` from `f`. One read(2) returns at most ~2 GiB on Linux (a 128k-vocab fp32
    embedding is larger), and a truncated file returns short: loop, and refuse to leave garbage."""
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            raise ValueError(f"{path} is truncated: tensor {name!r} needs {len(buffer)} bytes, found {done}")
        done += got


def iter_tensors(path: Path, names: list[str] | None = None):
    """Yield (name, tensor) in file order; each tensor is read into fresh memory, nothing kept."""
    header, data_start = read_header(path)
    wanted = header if names is None else {k: header[k] for k in names}
    order = sorted(wanted, key=lambda k: wanted[k]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name in order:
            info = wanted[name]
            start, end = info["data_offsets"]
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which peftcore does not read")
            tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])  # its span: checked by read_header
            f.seek(data_start + start)
            if end > start:
                read_exactly(f, memoryview(tensor.view(-1).view(torch.uint8).numpy()), path, name)
            yield name, tensor


def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Contiguous CPU copies, HF's `{"format": "pt"}` metadata (transformers refuses files without it)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata={"format": "pt"})
