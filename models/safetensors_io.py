"""Reading and writing safetensors files one tensor at a time.

Why not `safe_open`: its memory map stays open for the whole load and every page it touches is
charged to the process' RSS, so loading a checkpoint costs two copies of it. Reading each tensor
straight into its final storage with `readinto` costs one copy plus the header.
"""
from __future__ import annotations

import json
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


def read_header(path: Path) -> tuple[dict, int]:
    """-> ({name: {"dtype", "shape", "data_offsets"}}, byte offset where tensor data starts)."""
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
    header.pop("__metadata__", None)
    return header, 8 + n


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
            tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            if end - start != tensor.numel() * tensor.element_size():
                raise ValueError(f"{path}: tensor {name!r} spans {end - start} bytes but its shape and dtype need "
                                 f"{tensor.numel() * tensor.element_size()}")
            f.seek(data_start + start)
            if end > start:
                read_exactly(f, memoryview(tensor.view(-1).view(torch.uint8).numpy()), path, name)
            yield name, tensor


def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Contiguous CPU copies, HF's `{"format": "pt"}` metadata (transformers refuses files without it)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata={"format": "pt"})
