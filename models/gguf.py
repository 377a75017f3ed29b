"""A reader of llama.cpp's GGUF files (versions 2 and 3, little-endian): metadata, tensor table, tensors.

Layout (ggml/docs/gguf.md; every integer little-endian):

    magic b"GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type u32, value)
    tensor_count x  (name: string, n_dims u32, ne: n_dims x u64, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then the data section; tensor offsets count from its start

    string = length u64 + UTF-8 bytes (no terminator); array = item_type u32 + count u64 + items.

ne[0] is the fastest-varying (row) dim, so a tensor's torch shape is ne reversed. The data section is
memory-mapped; `raw()` returns zero-copy views of it, `tensor()` dequantizes through
`peftcore.kernels.gguf_quants`. Nothing in the file is executed: values are only unpacked.

Every malformed file raises one `GGUFError`, one line naming the file and the byte offset: never an
IndexError / struct.error from a read past the end, and no allocation sized by an unchecked count.
"""
from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from peftcore.kernels.gguf_quants import dequantize, format_of, row_bytes

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 (Aug 2023) had u32 counts; v3 only added big-endian files, which we refuse
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
MAX_NESTING = 8  # arrays of arrays deeper than this are refused (llama.cpp itself reads no nested arrays)

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FIXED = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
          UINT64: "Q", INT64: "q", FLOAT64: "d", BOOL: "B"}
_MIN_SIZE = {STRING: 8, ARRAY: 12}  # fewest bytes one item can take: bounds a count before looping over it


class GGUFError(ValueError):
    """A malformed or unsupported GGUF file; the message names the file and the byte offset."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ne reversed, so shape[-1] is the row length ne[0]
    ggml_type: int
    offset: int  # bytes from the start of the data section
    nbytes: int | None  # None: a GGML type peftcore cannot decode (its size is unknown too)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; each failure is a GGUFError at the read's offset."""

    def __init__(self, buf, size: int, file: str):
        self.buf, self.size, self.file, self.pos = buf, size, file, 0

    def error(self, at: int, message: str) -> GGUFError:
        return GGUFError(f"{self.file}: byte {at}: {message}")

    def take(self, n: int, what: str) -> int:
        """Claim the next n bytes; -> their offset."""
        start = self.pos
        if n > self.size - start:
            raise self.error(start, f"truncated {what}: needs {n} bytes, the file ends at byte {self.size}")
        self.pos = start + n
        return start

    def unpack(self, code: str, what: str, count: int = 1) -> tuple:
        # size before format: struct refuses (struct.error) a count as large as a corrupt u64 can be
        start = self.take(count * struct.calcsize(f"<{code}"), what)
        return struct.unpack_from(f"<{count}{code}", self.buf, start)

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u64(f"length of {what}")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(at, f"{what} is not valid UTF-8 ({e.reason} at byte {start + e.start})") from None

    def value(self, vtype: int, what: str, at: int, depth: int = 0):
        """One metadata value of type `vtype` (read at byte `at`) as a plain Python value."""
        if vtype == BOOL:
            return self.bools(1, what)[0]
        if vtype in _FIXED:
            return self.unpack(_FIXED[vtype], what)[0]
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_NESTING:
                raise self.error(at, f"{what}: arrays nested deeper than {MAX_NESTING} levels")
            item_at = self.pos
            item_type, count = self.u32(f"item type of {what}"), self.u64(f"length of {what}")
            return self.array(item_type, count, what, item_at, depth + 1)
        raise self.error(at, f"{what} has unknown value type {vtype} (GGUF defines 0-12)")

    def array(self, item_type: int, count: int, what: str, at: int, depth: int) -> list:
        if item_type == BOOL:
            return self.bools(count, what)
        if item_type in _FIXED:  # one struct call for the whole run (token scores: 10^5 floats)
            return list(self.unpack(_FIXED[item_type], what, count))
        if item_type not in _MIN_SIZE:
            raise self.error(at, f"{what} has unknown item type {item_type} (GGUF defines 0-12)")
        if count * _MIN_SIZE[item_type] > self.size - self.pos:  # before looping 2^64 times
            raise self.error(self.pos, f"truncated {what}: {count} items cannot fit in the "
                                       f"{self.size - self.pos} bytes left in the file")
        return [self.value(item_type, f"{what}[{i}]", self.pos, depth) for i in range(count)]

    def bools(self, count: int, what: str) -> list[bool]:
        start = self.take(count, what)
        raw = self.buf[start:start + count]
        if raw.translate(None, b"\x00\x01"):  # any byte left is neither 0 nor 1
            bad = next(i for i, b in enumerate(raw) if b > 1)
            raise self.error(start + bad, f"{what}: bool byte {raw[bad]}, expected 0 or 1")
        return [b == 1 for b in raw]


class GGUFFile:
    """An open GGUF file: `.metadata` (key -> str / int / float / bool / list), `.tensors` (name -> TensorInfo,
    in file order), `.raw(name)`, `.tensor(name)`. A context manager; `close()` drops the mapping.

        with GGUFFile("model.Q4_1.gguf") as f:
            f.metadata["general.architecture"], f.tensors["token_embd.weight"].shape, f.tensor("output_norm.weight")
    """

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            size = file.seek(0, 2)
            if size == 0:
                raise GGUFError(f"{self.path}: byte 0: empty file, not a GGUF file")
            # Read-only mapping (as numpy.memmap mode "r" in the gguf package): a copy-on-write one
            # (ACCESS_COPY) is charged in full to the commit limit, so a file larger than RAM + swap
            # would fail to map under Linux's default overcommit heuristic.
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        cursor = _Cursor(self._map, size, str(self.path))
        self.version, tensor_count, kv_count = self._read_header(cursor)
        self.metadata, alignment_at = self._read_metadata(cursor, kv_count)
        infos = [self._read_tensor_info(cursor) for _ in range(tensor_count)]
        self.alignment = self._alignment(cursor, alignment_at)
        self.data_offset = -(-cursor.pos // self.alignment) * self.alignment  # padded, from the file's start
        self.tensors = self._check_tensors(cursor, infos)

    # ---- parsing ---------------------------------------------------------------------------------

    @staticmethod
    def _read_header(c: _Cursor) -> tuple[int, int, int]:
        magic = c.buf[0:4]
        c.take(4, "magic")
        if magic != MAGIC:
            raise c.error(0, f"not a GGUF file: starts with {magic!r}, expected {MAGIC!r}")
        version = c.u32("version")
        if version not in SUPPORTED_VERSIONS:
            # the gguf package's test: versions 2 / 3 written big-endian read as 2 << 24 / 3 << 24
            if version and version & 0xFFFF == 0:
                raise c.error(4, f"big-endian GGUF (version {int.from_bytes(c.buf[4:8], 'big')}); only "
                                 "little-endian files are supported")
            raise c.error(4, f"GGUF version {version} is not supported (supported: 2, 3); "
                             "re-convert the model with a current llama.cpp")
        return version, c.u64("tensor count"), c.u64("metadata key/value count")

    @staticmethod
    def _read_metadata(c: _Cursor, kv_count: int) -> tuple[dict[str, object], int | None]:
        metadata: dict[str, object] = {}
        alignment_at = None
        for i in range(kv_count):
            at = c.pos
            key = c.string(f"metadata key {i}")
            if key in metadata:
                raise c.error(at, f"duplicate metadata key {key!r}")
            type_at = c.pos
            vtype = c.u32(f"value type of {key!r}")
            if key == "general.alignment":
                alignment_at = type_at
                if vtype != UINT32:  # the spec's type, and the only one llama.cpp and the gguf package accept
                    raise c.error(type_at, f"general.alignment has value type {vtype}, expected {UINT32} (uint32)")
            metadata[key] = c.value(vtype, repr(key), type_at)
        return metadata, alignment_at

    @staticmethod
    def _read_tensor_info(c: _Cursor) -> tuple[int, str, list[int], int, int]:
        at = c.pos
        name = c.string("tensor name")
        n_dims = c.u32(f"dim count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise c.error(at, f"tensor {name!r} has {n_dims} dims; GGML tensors have at most {MAX_DIMS}")
        ne = list(c.unpack("Q", f"dims of tensor {name!r}", n_dims))
        ggml_type = c.u32(f"type of tensor {name!r}")
        offset = c.u64(f"data offset of tensor {name!r}")
        return at, name, ne, ggml_type, offset

    def _alignment(self, c: _Cursor, alignment_at: int | None) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise c.error(alignment_at, f"general.alignment {alignment} is not a power of two")
        return alignment

    def _check_tensors(self, c: _Cursor, infos) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for at, name, ne, ggml_type, offset in infos:
            if name in tensors:
                raise c.error(at, f"duplicate tensor name {name!r}")
            if offset % self.alignment:
                raise c.error(at, f"tensor {name!r} has data offset {offset}, not a multiple of the "
                                  f"alignment {self.alignment}")
            nbytes = self._nbytes(c, at, name, ne, ggml_type)
            start = self.data_offset + offset
            if nbytes is not None and start + nbytes > self.size:
                raise c.error(start, f"tensor {name!r} data ({nbytes} bytes from byte {start}) runs past the end "
                                     f"of the file at byte {self.size}: truncated file?")
            tensors[name] = TensorInfo(name, tuple(reversed(ne)), ggml_type, offset, nbytes)
        return tensors

    @staticmethod
    def _nbytes(c: _Cursor, at: int, name: str, ne: list[int], ggml_type: int) -> int | None:
        try:
            format_of(ggml_type)
        except ValueError:
            return None  # metadata (a tokenizer) stays readable; raw() / tensor() name the type
        try:
            return row_bytes(ggml_type, ne[0] if ne else 1) * prod(ne[1:])
        except ValueError as e:
            raise c.error(at, f"tensor {name!r}: {e}") from None

    # ---- tensors ---------------------------------------------------------------------------------

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as stored: a 1-D uint8 zero-copy view of the READ-ONLY mapping.

        Clone before any in-place op: writing to a read-only page kills the process (SIGSEGV), it is no
        Python error. The view stays valid after close() (it holds the mapping).
        """
        info = self._info(name)
        if info.nbytes is None:
            try:
                format_of(info.ggml_type)
            except ValueError as e:
                raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from None
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():
            # torch warns that the buffer is not writable; the docstring above is the caller's contract
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes,
                                    offset=self.data_offset + info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as float32 of its torch shape, dequantized into new memory (never a view)."""
        info = self._info(name)
        return dequantize(self.raw(name), info.ggml_type, info.shape)

    def _info(self, name: str) -> TensorInfo:
        if self._map is None:
            raise ValueError(f"{self.path} is closed")
        if name not in self.tensors:
            shown = ", ".join(list(self.tensors)[:8]) + (" ..." if len(self.tensors) > 8 else "")
            raise KeyError(f"no tensor {name!r} in {self.path} (it has {len(self.tensors)}: {shown or 'none'})")
        return self.tensors[name]

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the mapping. Not mmap.close(): torch.frombuffer keeps no buffer export, so unmapping
        under a live raw() view would leave it pointing at freed pages; each view holds a reference
        to the mmap object instead, and the mapping goes with the last of them."""
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")
