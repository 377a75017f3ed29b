"""kernels/gguf_matmul_kernels.py on CPU through Triton's interpreter: the forward (tiled and split-K)
and transposed kernels on Q4_0 / Q4_1 / Q8_0 weights quantized by the `gguf` package (the test
oracle, imported here only) vs the module's torch references; the dequantized weight read out bit
for bit; supports(); and an offline compile of the kernels for sm_80 / sm_90 (slow).

fp32 and fp16 inputs: the interpreter's tl.dot is wrong on bf16 operands (the kernels upcast them
when interpreting, which the one-hot test exercises; tests/kernels/interpreter.py, _triton.py).
"""
import numpy as np
import pytest
import torch

from peftcore.kernels import gguf_blocks as G
from tests.kernels.interpreter import run_compiled, triton_interpreter
from tests.tolerances import assert_close

triton = pytest.importorskip("triton")
gguf = pytest.importorskip("gguf")
import peftcore.kernels.gguf_matmul_kernels as gguf_kernels_module  # noqa: E402  (needs triton)
import peftcore.kernels.quant_matmul_kernels as quant_kernels_module  # noqa: E402

QTYPES = {"q4_0": G.Q4_0, "q4_1": G.Q4_1, "q8_0": G.Q8_0}
# (M, N, K, bias, lora): M 1 and 3 take split-K (two K ranges at K = 96), 17 the tiled GEMM; N 5 and
# 33 leave partial N tiles. Every (M, N, K), with (bias, lora) cycling so that each M meets all four
# and each (N, K) three: the full product passes too (288 cases, 30 s here), a quarter keeps it fast.
FLAGS = [(False, False), (True, False), (False, True), (True, True)]
CASES = [(M, N, K, *FLAGS[(i + j) % 4]) for j, M in enumerate((1, 3, 17))
         for i, (N, K) in enumerate([(5, 32), (5, 96), (33, 32), (33, 96)])]
R, SCALE = 4, 2.0


@pytest.fixture(scope="module")
def gk():
    with triton_interpreter(quant_kernels_module, gguf_kernels_module) as (_, kernels):
        assert type(kernels._gmm_kernel).__name__ == "InterpretedFunction"
        yield kernels


def gguf_weight(qtype: int, N: int, K: int, seed: int = 0) -> tuple[G.BlockWeight, np.ndarray]:
    """A random (N, K) weight quantized by gguf.quants -> (its BlockWeight, the file bytes)."""
    w = np.random.default_rng(seed).standard_normal((N, K), dtype=np.float32) / np.float32(K**0.5)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType(qtype))
    return G.from_gguf_bytes(torch.from_numpy(raw.reshape(-1).copy()), qtype, (N, K)), raw


def operands(M, N, K, dtype, bias, lora, seed):
    """Inputs in dtype, scaled (as test_quant_matmul's make_case) so outputs are about 0.5-1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 0.5
    dy = torch.randn(M, N, generator=g) * 0.5 / M**0.5
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(R, K, generator=g) / K**0.5
    B = torch.randn(N, R, generator=g) / N**0.5
    # forward: z = x A^T (M, r) and B^T (r, N), a strided view; transposed: dY B (M, r) and A (r, K)
    lora_fwd = (x @ A.t(), B.t()) if lora else (None, None)
    lora_t = (dy @ B, A) if lora else (None, None)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(dy), cast(b), tuple(map(cast, lora_fwd)), tuple(map(cast, lora_t))


def up(t):
    return None if t is None else t.float()


@pytest.mark.parametrize("M, N, K, bias, lora", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("qtype", QTYPES)
def test_kernels_match_the_reference(gk, qtype, dtype, M, N, K, bias, lora):
    """Both kernels in dtype vs the fp32 reference on the same (dtype-rounded) operands."""
    w, _ = gguf_weight(QTYPES[qtype], N, K, seed=M + N + K)
    x, dy, b, (z, bt), (gb, a) = operands(M, N, K, dtype, bias, lora, seed=M * N + K)
    y = gk.forward(x, w, b, z, bt, SCALE)
    dx = gk.transposed(dy, w, gb, a, SCALE)
    assert y.dtype == dx.dtype == dtype and y.shape == (M, N) and dx.shape == (M, K)
    assert_close(y, gk.forward_reference(x.float(), w, up(b), up(z), up(bt), SCALE))
    assert_close(dx, gk.transposed_reference(dy.float(), w, up(gb), up(a), SCALE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", QTYPES)
def test_kernels_dequantize_bit_exact(gk, qtype, dtype):
    """One-hot inputs read W out of both kernels (K = 128: two 64-wide tiles of two blocks each; N = 20:
    a partial N tile): it equals gguf_blocks.dequantize(dtype), whose fp32 values equal the oracle's."""
    N, K = 20, 128
    w, raw = gguf_weight(QTYPES[qtype], N, K)
    dense = G.dequantize(w)
    assert torch.equal(dense, torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(w.ggml_type))))
    forward = gk.forward(torch.eye(K, dtype=dtype), w, None, None, None, 0.0)  # (K, N) = W^T, tiled path
    transposed = gk.transposed(torch.eye(N, dtype=dtype), w, None, None, 0.0)  # (N, K) = W
    assert torch.equal(forward, dense.to(dtype).t()) and torch.equal(transposed, dense.to(dtype))


def test_supports_the_planar_types_only(gk):
    for qtype in QTYPES.values():
        assert gk.supports(gguf_weight(qtype, 3, 64)[0])
    # gguf.quants cannot quantize Q6_K (NotImplementedError in gguf 0.19); from_gguf_bytes only needs
    # the byte count: one 256-weight row of 210 bytes
    q6_k = G.from_gguf_bytes(torch.randint(0, 256, (2 * 210,), dtype=torch.uint8), 14, (2, 256))
    assert not q6_k.planar and not gk.supports(q6_k)


COMPILE_SCRIPT = r"""
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peftcore.kernels import gguf_matmul_kernels as gk

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# What the launcher's specialization sees on real shapes: 16-byte aligned tensors, and N, K and the
# row strides multiples of 16 (without it the code loads are not vectorized and every config spills)
ALIGNED = {"N", "K", "k_per_split", "stride_xm", "stride_om", "stride_split", "stride_dm"}

def stack_bytes(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))

def compile_for(kernel, arch, dtype, qtype, config, out_dtype):
    # Worst case: LoRA epilogue and bias; Q4_1 (two scale planes) or Q8_0 (the widest codes)
    pointers = dict(x_ptr=dtype, dy_ptr=dtype, qs_ptr="*i8" if qtype == 8 else "*u8", d_ptr="*fp16",
                    m_ptr="*fp16", bias_ptr=dtype, l_ptr=dtype, r_ptr=dtype, out_ptr=out_dtype)
    consts = dict(QTYPE=qtype, HAS_BIAS=True, HAS_LORA=True, R_PAD=16, INTERPRET_BF16=False, **config.kwargs)
    scalar = lambda name: "fp32" if name == "lora_scale" else "i32"
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, scalar(p.name)) for p in kernel.params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if not p.is_constexpr and (signature[p.name].startswith("*") or p.name in ALIGNED)}
    source = ASTSource(fn=kernel, signature=signature, constexprs={k: v for k, v in consts.items() if k in signature},
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    assert compiled.asm["cubin"] and compiled.metadata.shared <= {80: 166912, 90: 232448}[arch]
    if os.path.exists(CUOBJDUMP):
        assert stack_bytes(compiled.asm["cubin"]) == 0, (kernel.__name__, arch, config)

compile_for(gk._gmm_kernel, 90, "*bf16", 8, gk.HOPPER_TILED[0], "*bf16")
compile_for(gk._gmm_kernel, 90, "*bf16", 3, gk.HOPPER_SKINNY[5], "*fp32")
compile_for(gk._gmm_kernel, 80, "*fp16", 8, gk.AMPERE_TILED[0], "*fp16")
compile_for(gk._gmm_kernel, 80, "*bf16", 8, gk.AMPERE_SKINNY[4], "*fp32")
compile_for(gk._gmm_t_kernel, 90, "*bf16", 8, gk.HOPPER_T[2], "*bf16")
compile_for(gk._gmm_t_kernel, 80, "*fp32", 3, gk.AMPERE_T[0], "*fp32")
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper():
    """Triton's real compiler builds the kernels for sm_80 / sm_90 without a GPU (a subprocess: this
    module's fixture may hold the kernels interpreted)."""
    done = run_compiled(COMPILE_SCRIPT)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
