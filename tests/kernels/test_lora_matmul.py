"""kernels/lora_matmul.py on CPU through Triton's interpreter: outputs and every gradient vs fp32 autograd
of the torch reference, odd shapes, three dtypes, bias, dropout (one mask for forward and backward).
The `lm` fixture runs the module through the interpreter (tests/kernels/interpreter.py) and wraps
the kernels in launch counters, to prove the Triton path ran.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")  # Linux-only dependency; elsewhere every call takes the reference

import peftcore.kernels.dispatch as dispatch  # noqa: E402
import peftcore.kernels.lora_matmul as lora_matmul_module  # noqa: E402
from tests.kernels.interpreter import run_compiled, triton_interpreter  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class LaunchCounter:
    """Stands in for a @triton.jit kernel: counts `kernel[grid]` launches, then delegates."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(scope="module")
def lm():
    with triton_interpreter(lora_matmul_module) as (module,):
        module._lora_fwd_kernel = LaunchCounter(module._lora_fwd_kernel)
        module._lora_bwd_kernel = LaunchCounter(module._lora_bwd_kernel)
        yield module


def launches(lm) -> tuple[int, int]:
    return lm._lora_fwd_kernel.launches, lm._lora_bwd_kernel.launches


def make_inputs(M, K, N, r, dtype, bias, lead=()):
    """Unit-scale operands so every intermediate (x A^T, dY B, the output) is O(1)."""
    x = torch.randn(*lead, M, K)
    W = torch.randn(N, K) / K**0.5
    b = torch.randn(N) if bias else None
    A = torch.randn(r, K) / K**0.5
    B = torch.randn(N, r) / r**0.5
    dy = torch.randn(*lead, M, N) / N**0.5
    return [None if t is None else t.to(dtype) for t in (x, W, b, A, B, dy)]


def run_with_grads(fn, x, W, b, A, B, dy, scaling, p, training, seed, grad_x=True, grad_lora=True):
    """fn's output and the grads of (x, A, B) as fresh leaves (None where not required)."""
    x = x.detach().requires_grad_(grad_x)
    A, B = (t.detach().requires_grad_(grad_lora) for t in (A, B))
    torch.manual_seed(seed)  # the dropout mask comes from torch's RNG on both paths
    y = fn(x, W, b, A, B, scaling, p, training)
    y.backward(dy)
    return y, x.grad, A.grad, B.grad


def fp32_expected(lm, *args, **kwargs):
    """The reference on fp32 copies of the (already rounded) operands: the oracle for every dtype."""
    x, W, b, A, B, dy = (None if t is None else t.float() for t in args[:6])
    return run_with_grads(lm.lora_matmul_reference, x, W, b, A, B, dy, *args[6:], **kwargs)


@given(
    M=st.integers(1, 19), K=st.integers(8, 70), N=st.integers(8, 70), r=st.integers(1, 16),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), lead=st.sampled_from([(), (1,), (2,)]),
    scaling=st.sampled_from([0.5, 2.0]), dropout=st.sampled_from([(0.0, True), (0.3, True), (0.3, False)]),
)
def test_forward_and_gradients_match_fp32_reference(lm, M, K, N, r, dtype, bias, lead, scaling, dropout):
    p, training = dropout
    x, W, b, A, B, dy = make_inputs(M, K, N, r, dtype, bias, lead)
    before = launches(lm)
    got = run_with_grads(lm.lora_matmul, x, W, b, A, B, dy, scaling, p, training, seed=7)
    assert launches(lm) == (before[0] + 1, before[1] + 1)  # the Triton path ran, forward and backward
    want = fp32_expected(lm, x, W, b, A, B, dy, scaling, p, training, seed=7)
    assert got[0].shape == (*lead, M, N) and got[0].dtype == dtype
    for name, g, w in zip(("y", "dX", "dA", "dB"), got, want):
        assert g.dtype == dtype, name
        assert_close(g, w, dtype, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("grad_x,grad_lora", [(True, False), (False, True)])
def test_partial_gradients_skip_work_and_stay_right(lm, grad_x, grad_lora):
    """x frozen (first layer after an embedding) skips the dY W GEMM; frozen A, B skip dA, dB and h."""
    x, W, b, A, B, dy = make_inputs(13, 40, 24, 8, torch.float32, bias=True)
    got = run_with_grads(lm.lora_matmul, x, W, b, A, B, dy, 2.0, 0.2, True, 3, grad_x, grad_lora)
    want = fp32_expected(lm, x, W, b, A, B, dy, 2.0, 0.2, True, 3, grad_x=grad_x, grad_lora=grad_lora)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert_close(g, w)


def test_trainable_weight_and_bias_get_gradients(lm):
    """W and the bias are frozen in LoRA; if a caller trains them anyway, their grads must be right."""
    x, W, b, A, B, dy = make_inputs(9, 20, 18, 4, torch.float32, bias=True)
    grads = []
    for fn in (lm.lora_matmul, lm.lora_matmul_reference):
        Wl, bl = W.clone().requires_grad_(), b.clone().requires_grad_()
        fn(x, Wl, bl, A, B, 1.5).backward(dy)
        grads.append((Wl.grad, bl.grad))
    assert_close(grads[0][0], grads[1][0])
    assert_close(grads[0][1], grads[1][1])


def cancelling_case(which: str):
    """bf16 operands (M=2, K=N=16, r=2) where one entry of `which` is s * (64 - 63.5) = 1/6 while its
    terms are s * 64 = 21.33 and s * 63.5 = 21.17: rounding those to bf16 (ulp 0.125) moves it by ~0.08."""
    x, A, B, dy = torch.zeros(2, 16), torch.zeros(2, 16), torch.zeros(16, 2), torch.zeros(2, 16)
    if which == "y":  # y[0] = s (h00 - h01) B[0]: h0 = (64, 63.5), B[:, 0] = 1, B[:, 1] = -1
        x[0, 0], A[:, 0], B[:, 0], B[:, 1], dy[0, 0] = 1, torch.tensor([64, 63.5]), 1, -1, 1
    elif which == "dA":  # dA[:, 0] = s (g0 - g1): g = dY B = (64, 63.5), x[:, 0] = (1, -1)
        x[0, 0], x[1, 0], B[0] = 1, -1, 1
        dy[0, 0], dy[1, 0] = 64, 63.5
    else:  # dB[0] = s (h0 - h1): h rows 64 and 63.5, dY[:, 0] = (1, -1)
        x[0, 0], x[1, 1], A[:, 0], A[:, 1], dy[0, 0], dy[1, 0] = 1, 1, 64, 63.5, 1, -1
    W = torch.zeros(16, 16)
    return [x.bfloat16(), W.bfloat16(), None, A.bfloat16(), B.bfloat16(), dy.bfloat16()]  # bias None


@pytest.mark.parametrize("which", ["y", "dA", "dB"])
def test_rank_r_intermediates_are_not_rounded_to_bf16(lm, which):
    """s h and s dY B enter the bf16 dots as hi + lo pairs, so cancelling sums stay within tolerance."""
    args = (*cancelling_case(which), 1 / 3, 0.0, False)
    for g, w in zip(run_with_grads(lm.lora_matmul, *args, seed=0), fp32_expected(lm, *args, seed=0)):
        assert_close(g, w, torch.bfloat16)


def test_bf16_output_is_rounded_to_nearest_even(lm):
    """x W^T is exact in fp32 here (small integers times sixteenths), so y must equal torch's
    round-to-nearest-even of it bit for bit, as a GPU store gives (the interpreter's own cast truncates)."""
    x = torch.randint(-8, 9, (7, 32)).float()
    W = torch.randint(-64, 65, (20, 32)) / 16
    zeros_A, zeros_B = torch.zeros(4, 32, dtype=torch.bfloat16), torch.zeros(20, 4, dtype=torch.bfloat16)
    y = lm.lora_matmul(x.bfloat16(), W.bfloat16(), None, zeros_A, zeros_B, 1.0)
    exact = x @ W.T
    assert (exact.bfloat16().float() != exact).float().mean() > 0.5  # most entries need rounding
    assert torch.equal(y, exact.bfloat16())


def test_dropout_mask_is_shared_by_forward_and_backward(lm):
    """With W = 0, A = B = I and x = dY = 1, each of y, dX, dA and dB shows the keep mask:
    y = dX = s keep / (1 - p) and every row of dA and dB equals y summed over rows. A backward
    that drew its own mask would disagree with the forward's."""
    M, d, p, s = 48, 32, 0.25, 1.5
    x = torch.ones(M, d, requires_grad=True)
    A, B = torch.eye(d).requires_grad_(), torch.eye(d).requires_grad_()
    y = lm.lora_matmul(x, torch.zeros(d, d), None, A, B, s, dropout_p=p, training=True)
    y.backward(torch.ones(M, d))
    kept = y != 0
    assert_close(y, kept * (s / (1 - p)))  # every entry is 0 or s / (1 - p)
    assert_close(x.grad, y)
    assert_close(A.grad, y.sum(0).expand(d, d))
    assert_close(B.grad, y.sum(0).expand(d, d))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.05  # 1536 draws: 4.5 standard deviations


def test_eval_mode_and_p_zero_do_not_drop(lm):
    x, W, b, A, B, _ = make_inputs(5, 24, 16, 4, torch.float32, bias=False)
    want = lm.lora_matmul_reference(x, W, b, A, B, 2.0)
    before = launches(lm)
    assert_close(lm.lora_matmul(x, W, b, A, B, 2.0, dropout_p=0.5, training=False), want)
    assert_close(lm.lora_matmul(x, W, b, A, B, 2.0, dropout_p=0.0, training=True), want)
    assert launches(lm)[0] == before[0] + 2


def test_rank_128_and_transposed_weight(lm):
    """The largest rank the kernel takes, with W given as a transposed view (GPT-2 Conv1D stores (in, out))."""
    x, W, b, A, B, dy = make_inputs(3, 20, 17, 128, torch.float32, bias=True)
    W_t = W.T.contiguous().T  # same values, strides (1, N)
    before = launches(lm)
    got = run_with_grads(lm.lora_matmul, x, W_t, b, A, B, dy, 0.5, 0.0, False, 0)
    assert launches(lm)[0] == before[0] + 1
    for g, w in zip(got, fp32_expected(lm, x, W, b, A, B, dy, 0.5, 0.0, False, 0)):
        assert_close(g, w)


def test_rank_above_max_and_cpu_without_interpreter_take_the_reference(lm, monkeypatch):
    x, W, b, A, B, _ = make_inputs(4, 16, 8, lm.R_MAX + 2, torch.float32, bias=True)
    before = launches(lm)
    assert_close(lm.lora_matmul(x, W, b, A, B, 1.0), lm.lora_matmul_reference(x, W, b, A, B, 1.0))
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    assert dispatch.use_triton(x) is False
    x, W, b, A, B, _ = make_inputs(4, 16, 8, 2, torch.float32, bias=True)
    assert_close(lm.lora_matmul(x, W, b, A, B, 1.0), lm.lora_matmul_reference(x, W, b, A, B, 1.0))
    assert launches(lm) == before


@pytest.mark.parametrize("change,match", [
    (dict(W=torch.zeros(8, 15)), r"weight \(8, 15\) has 15 input features but x \(4, 16\) has 16"),
    (dict(A=torch.zeros(2, 15)), r"lora_A has shape \(2, 15\), expected \(r, K\) = \(2, 16\)"),
    (dict(B=torch.zeros(9, 2)), r"lora_B \(9, 2\) has 9 output features but weight \(8, 16\) has 8"),
    (dict(b=torch.zeros(7)), r"bias has shape \(7,\), expected \(8,\)"),
    (dict(A=torch.zeros(2, 16, dtype=torch.float16)), r"lora_A is torch.float16 on cpu but x is torch.float32"),
    (dict(p=1.5), r"dropout_p must be in \[0, 1\], got 1.5"),
])
def test_bad_inputs_name_the_tensor_and_shapes(lm, change, match):
    args = dict(x=torch.zeros(4, 16), W=torch.zeros(8, 16), b=None, A=torch.zeros(2, 16), B=torch.zeros(8, 2), p=0.0)
    args.update(change)
    for fn in (lm.lora_matmul, lm.lora_matmul_reference):
        with pytest.raises(ValueError, match=match):
            fn(args["x"], args["W"], args["b"], args["A"], args["B"], 1.0, args["p"], True)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_no_grad_forward_launches_forward_only(lm, p):
    x, W, b, A, B, _ = make_inputs(3, 9, 8, 1, torch.float16, bias=True)  # r = 1
    A.requires_grad_()
    before = launches(lm)
    with torch.no_grad():
        torch.manual_seed(5)
        y = lm.lora_matmul(x, W, b, A, B, 2.0, p, training=True)
        torch.manual_seed(5)
        want = lm.lora_matmul_reference(x.float(), W.float(), b.float(), A.float(), B.float(), 2.0, p, training=True)
    assert y.grad_fn is None and launches(lm) == (before[0] + 1, before[1])
    assert_close(y, want, torch.float16)


COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import peftcore.kernels.lora_matmul as lm

def compile_for(kernel, arch, dtype, tile, consts):
    # The largest tiles each architecture's autotune list holds, with every optional branch enabled.
    bm, out, loop, stages, warps = tile
    backward = kernel is lm._lora_bwd_kernel
    blocks = {"BLOCK_M": bm, "BLOCK_K" if backward else "BLOCK_N": out, "BLOCK_N" if backward else "BLOCK_K": loop,
              "GROUP_M": 8}
    pointers = dict(keep_ptr="*u8", h_ptr="*fp32", da_ptr="*fp32", db_ptr="*fp32")
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = pointers.get(p.name, dtype)
        else:
            signature[p.name] = "fp32" if p.name in ("scaling", "inv_keep") else "i32"
    consts = dict(consts, INTERPRET_BF16=False, PRECISION="tf32", **blocks)
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    assert compiled.asm["cubin"] and compiled.metadata.shared <= {80: 166912, 90: 232448}[arch], (
        compiled.metadata.shared
    )

fwd = dict(HAS_BIAS=True, HAS_MASK=True, STORE_H=True, R_PAD=64)
bwd = dict(HAS_MASK=True, NEED_DX=True, NEED_DLORA=True, R_PAD=16)
compile_for(lm._lora_fwd_kernel, 90, "*bf16", (128, 256, 64, 3, 8), dict(fwd, R_PAD=16))
compile_for(lm._lora_fwd_kernel, 80, "*fp16", (128, 128, 32, 4, 4), fwd)
compile_for(lm._lora_bwd_kernel, 90, "*bf16", (128, 256, 64, 3, 8), bwd)
compile_for(lm._lora_bwd_kernel, 80, "*fp32", (128, 128, 64, 3, 8), bwd)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper():
    """Triton's real compiler (with its bundled ptxas) builds the LoRA kernels for sm_80 / sm_90
    without a GPU, at the largest autotune tiles (shared memory within each SM's limit). A
    subprocess: this module's fixture keeps the kernels interpreted while it is active."""
    done = run_compiled(COMPILE_SCRIPT)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
