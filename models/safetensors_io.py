"""Reading and writing safetensors files one tensor at a time.

Why not `safe_open`: its memory map stays open for the whole load and every page it touches is
charged to the process' RSS, so loading a checkpoint costs two copies of it. Reading each tensor
straight into its final storage with `readinto` costs one copy plus the header.
"""
from __future__ import annotations

import json
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
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


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
            f.seek(data_start + start)
            if end > start:
                f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            yield name, tensor


def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Contiguous CPU copies, HF's `{"format": "pt"}` metadata (transformers refuses files without it)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata={"format": "pt"})
