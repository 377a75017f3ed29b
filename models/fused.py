"""Fused training ops for the decoder models: fewer passes over activations, less kept for backward.

Each op is an `autograd.Function` whose forward computes exactly what the plain formula computes
(same ops in the same order, so the training path equals the inference path bit for bit) and
whose backward is written out by hand, keeping only what it needs. The plain formulas are the
oracle in tests/models/test_fused_ops.py (gradcheck in float64, fp32 against autograd).

    rms_norm(x, weight, eps)          keeps x and rstd (B*T floats), not x * rstd or its product
    silu_mul(gate, up)                keeps gate and up; silu(gate) is recomputed in backward
    rope(x, cos, sin)                 keeps cos and sin; backward is the inverse rotation
    causal_lm_loss(head, hidden, labels)
                                      summed shifted cross-entropy without the (B*T, vocab) logits:
                                      online softmax over vocabulary chunks, gradient formed in forward
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # transformers' / PyTorch's default ignore_index for labels
# One chunk of logits: under glibc's mmap threshold (its pages are reused, not faulted in afresh
# for every chunk) and large enough for full-speed GEMMs.
CE_CHUNK_BYTES = 4 * 2**20
CE_MAX_ROWS = 4096  # rows per block of the online softmax (more rows: narrower vocabulary chunks)
CE_MIN_COLS = 512  # narrowest vocabulary chunk (GEMMs with a short inner dimension run slowly)
CE_MIN_ROWS = 64  # fewest rows per chunk when the head trains (row chunks over the whole vocabulary)
CE_SUM_LIMIT = 2.0**64  # a chunk's row sum of exp(z - shift) above this: raise the shift (fp32 max ~2^128)


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -- RMSNorm ------------------------------------------------------------------------------------
def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """transformers' LlamaRMSNorm: normalise in fp32 (fp64 stays fp64), cast back, scale. -> (out, rstd)."""
    h = upcast(x)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    normed = (h * rstd).to(x.dtype)  # always a fresh tensor: may be scaled in place
    if normed.dtype == torch.promote_types(normed.dtype, weight.dtype):
        return normed.mul_(weight), rstd
    return weight * normed, rstd


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x * r), r = (mean(x^2) + eps)^-1/2, rows of D features.

    With n = x * r and dn = dy * w:
        dr/dx = -r^3 x / D, so  dx = r * dn - x * r^3 * sum(dn * x) / D
        dw = sum over rows of dy * n   (only when the weight trains; LoRA freezes it)
    Saved: x and r. The normalised n (as large as x) is recomputed when dw needs it.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        h = upcast(x)
        dx = dw = None
        if ctx.needs_input_grad[1]:
            normed = (h * rstd).to(x.dtype)
            dw = (grad * normed).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dn = upcast((grad * weight).to(x.dtype))  # fresh: scaled in place below
            coef = (dn * h).sum(-1, keepdim=True).mul_(rstd.pow(3)).div_(-x.shape[-1])
            dx = dn.mul_(rstd).addcmul_(h, coef).to(x.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_forward(x, weight, eps)[0]


# -- SiLU(gate) * up ----------------------------------------------------------------------------
class SiluMulFunction(torch.autograd.Function):
    """y = silu(g) * u.  du = dy * silu(g);  dg = dy * u * silu'(g), silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).

    Saved: g and u (the inputs) only; silu(g), as wide as g, is recomputed in backward (one pass)
    instead of being held from forward to backward in every layer.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dgate = dup = None
        if ctx.needs_input_grad[1]:
            dup = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            dgate = grad * up
            torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)  # elementwise, in place
        return dgate, dup


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if needs_grad(gate, up):
        return SiluMulFunction.apply(gate, up)
    return F.silu(gate, inplace=True).mul_(up)  # no graph: gate is a fresh intermediate, reuse it


# -- rotary embedding ---------------------------------------------------------------------------
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Turn each pair (x1[i], x2[i]) of the two halves of the last dim by its angle (or back).

    out1 = x1 cos - x2 sin,  out2 = x2 cos + x1 sin  (inverse: the signs of the sin terms flip):
    the products written straight into the output halves, one half-size temporary, no
    rotate_half and no cat, and the same products and sums as transformers' formula, so
    bit-identical to it. The output keeps x's memory layout, so q / k stay views of the projection
    layout and their gradients need no copy on the way back.
    """
    out = torch.empty_like(x)
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    t = torch.mul(x2, sin)
    first = torch.mul(x1, cos, out=o1)
    first.add_(t) if inverse else first.sub_(t)
    torch.mul(x1, sin, out=t)
    second = torch.mul(x2, cos, out=o2)
    second.sub_(t) if inverse else second.add_(t)
    return out


class RopeFunction(torch.autograd.Function):
    """A rotation is orthogonal: the gradient is the output gradient turned back (R^T = R(-angle)).
    Saved: the (B, 1, T, head_dim/2) cos / sin tables only."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, inverse=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos, sin: (B, 1, T, head_dim // 2), no gradient through them."""
    if needs_grad(x):
        return RopeFunction.apply(x, cos, sin)
    return rotate(x, cos, sin)


# -- linear + cross-entropy -----------------------------------------------------------------------
def flat_buffer(rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(rows * cols, dtype=dtype or like.dtype, device=like.device)


class OnlineSoftmax:
    """Running state of one row block's softmax over vocabulary chunks (see vocab_chunks)."""

    def __init__(self, rows: int, width: int, want_grad: bool, dtype: torch.dtype, device):
        column = functools.partial(torch.zeros, (rows, 1), dtype=dtype, device=device)
        self.shift = None  # m: per-row shift, the max of the first chunk, raised when overtaken
        self.s_other, self.e_t, self.z_t = column(), column(), column()
        self.acc = torch.zeros(rows, width, dtype=dtype, device=device) if want_grad else None

    def raise_shift(self, z: torch.Tensor) -> None:
        """z: a chunk's unshifted logits; shift to max(m, row max of z), rescaling the sums."""
        top = z.amax(1, keepdim=True)
        if self.shift is None:
            self.shift = top
            return
        new = torch.maximum(self.shift, top)
        rescale = (self.shift - new).exp_()
        for t in (self.s_other, self.e_t) + ((self.acc,) if self.acc is not None else ()):
            t.mul_(rescale)
        self.shift = new

    def add(self, z_t, e, inside, local, w, check: bool = True) -> bool:
        """Take in e = exp(z - m) of one chunk (overwritten) and its shifted target logits z_t.
        -> False, adding nothing, if check finds a row sum above CE_SUM_LIMIT (or inf / nan)."""
        here = e.gather(1, local)
        e.scatter_(1, local, torch.where(inside, 0.0, here))  # the target's entry out of the sums
        s_chunk = e.sum(1, keepdim=True)
        if check and not bool((s_chunk <= CE_SUM_LIMIT).all()):
            return False
        self.z_t = torch.where(inside, z_t + self.shift, self.z_t)
        self.e_t = torch.where(inside, here, self.e_t)
        self.s_other.add_(s_chunk)
        if self.acc is not None:
            self.acc.addmm_(e, w if w.dtype == e.dtype else w.to(e.dtype))
        return True


def vocab_chunks(hidden, weight, targets, want_grad: bool):
    """-> (summed cross-entropy of `hidden @ weight.T` against `targets`, d(loss)/d(hidden) or None).

    Online softmax over vocabulary chunks (as flash attention does over keys), rows in blocks.
    Per chunk c: e = exp(h W_c^T - m) (a full-height GEMM; the shift -m is the GEMM's initial C,
    so it costs no pass of its own), the target's entry taken out into e_t; running sums
    s' = sum of the other e and acc = sum e W_c (a second full-height GEMM). The shift m is each
    row's max over the first chunk and is only raised (rescaling the sums by exp(m_old - m_new))
    when a chunk's sum shows the logits ran CE_SUM_LIMIT above it: values above 1 are fine, so
    usually no max pass, subtraction pass or rescale pass is needed after the first chunk.
    At the end, with s = s' + e_t: loss = m + log s - z_t and
    dh = softmax W - W[t] = (acc - s' W[t]) / s (no difference of near-equal terms when the
    target's probability is near 1). Nothing of size rows x vocab exists beyond one chunk.
    """
    n, width = hidden.shape
    vocab = weight.shape[0]
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    fold = hidden.dtype == acc_dtype  # the shift goes into the GEMM unless the logits need an upcast
    loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    dhidden = torch.empty_like(hidden) if want_grad else None
    block = min(n, CE_MAX_ROWS)
    cols = max(CE_MIN_COLS, CE_CHUNK_BYTES // (hidden.element_size() * block) // 128 * 128)
    buf = flat_buffer(block, min(cols, vocab), hidden)
    for r0 in range(0, n, block):
        h, t = hidden[r0:r0 + block], targets[r0:r0 + block, None]
        state = OnlineSoftmax(h.shape[0], width, want_grad, acc_dtype, h.device)
        for c0 in range(0, vocab, cols):
            w = weight[c0:c0 + cols]
            out = buf[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
            inside = (t >= c0) & (t < c0 + w.shape[0])  # rows whose target is in this chunk
            local = (t - c0).clamp_(0, w.shape[0] - 1)
            if fold and state.shift is not None:
                z = torch.addmm(state.shift.neg(), h, w.t(), out=out)  # z - m: the shift is the GEMM's initial C
                if state.add(z.gather(1, local), z.exp_(), inside, local, w):
                    continue
            # the first chunk, an upcast, or logits that ran far above the shift: max-subtracted
            z = torch.mm(h, w.t(), out=out).to(acc_dtype)
            state.raise_shift(z)
            z = z.sub_(state.shift)
            state.add(z.gather(1, local), z.exp_(), inside, local, w, check=False)
        s_all = state.s_other + state.e_t
        loss += (state.shift + s_all.log() - state.z_t).sum()
        if want_grad:
            w_t = weight.index_select(0, t.squeeze(1)).to(acc_dtype)  # (rows, width): the targets' rows of W
            dhidden[r0:r0 + block] = state.acc.addcmul_(w_t, state.s_other, value=-1).div_(s_all)
    return loss, dhidden


def row_chunks(hidden, weight, targets, dweight):
    """Summed cross-entropy, adding d(loss)/d(weight) into dweight; -> (loss, d(loss)/d(hidden)).

    For a trained head: dW = sum_i dz_i^T h_i needs each row's final softmax, so rows go in
    chunks over the whole vocabulary (log-softmax kernel, exp in place, minus one at the target).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    step = min(n, max(CE_MIN_ROWS, CE_CHUNK_BYTES // (4 * vocab)))
    logits = flat_buffer(step, vocab, hidden)
    logp = logits if acc_dtype == hidden.dtype else flat_buffer(step, vocab, hidden, acc_dtype)
    loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    dhidden = torch.empty_like(hidden)
    for start in range(0, n, step):
        h, t = hidden[start:start + step], targets[start:start + step, None]
        rows = h.shape[0]
        z = torch.mm(h, weight.t(), out=logits[: rows * vocab].view(rows, vocab))
        # in place (out=z) when no upcast is needed: the kernel finishes each row before writing it
        lp = torch.ops.aten._log_softmax.out(z.to(acc_dtype), -1, False, out=logp[: rows * vocab].view(rows, vocab))
        loss -= lp.gather(1, t).sum()
        p = lp.exp_()
        p.scatter_add_(1, t, p.new_full(t.shape, -1.0))  # softmax - onehot(target)
        dweight.addmm_(p.t(), h.to(acc_dtype))
        torch.mm(p.to(hidden.dtype), weight, out=dhidden[start:start + step])
    return loss, dhidden


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = sum_i [logsumexp(z_i) - z_i[t_i]], z_i = W h_i, over rows whose target is kept.

    dz_i = softmax(z_i) - onehot(t_i);  dh_i = dz_i W;  dW = sum_i dz_i^T h_i.
    The gradient is formed in forward while each chunk's logits are at hand (the loss is a
    scalar, so backward only scales it): no (rows, vocab) tensor outlives its chunk, and none is
    kept for backward. Saved: d(loss)/d(hidden) (rows x hidden) and, if W trains, dW.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        dw = None
        if ctx.needs_input_grad[1]:
            dw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
            loss, dh = row_chunks(hidden, weight, targets, dw)
        else:
            loss, dh = vocab_chunks(hidden, weight, targets, want_grad=True)
        ctx.save_for_backward(dh if ctx.needs_input_grad[0] else None, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        dh = dh * grad.to(dh.dtype) if dh is not None else None
        dw = (dw * grad).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sum over rows with targets != ignore_index of cross_entropy(hidden @ weight.T, targets), fp32.

    hidden (N, H), weight (V, H), targets (N,) -> scalar. Rows whose target is ignored are dropped
    before any GEMM (prompt tokens under SFT masking cost nothing).
    """
    keep = targets != ignore_index
    n_keep = int(keep.sum())
    if n_keep == 0:  # nothing to train: a zero that still backpropagates (zeros)
        return (hidden.sum() + weight.sum()).to(torch.promote_types(hidden.dtype, torch.float32)) * 0
    if n_keep < targets.numel():
        idx = keep.nonzero().squeeze(1)
        hidden, targets = hidden.index_select(0, idx), targets.index_select(0, idx)
    if needs_grad(hidden, weight):
        return LinearCrossEntropyFunction.apply(hidden, weight, targets)
    with torch.no_grad():
        return vocab_chunks(hidden, weight, targets, want_grad=False)[0]


def causal_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed next-token cross-entropy: position t predicts labels[:, t + 1]; labels equal to
    ignore_index are not trained. hidden (B, T, H), labels (B, T) -> fp32 scalar.

    A plain bias-free nn.Linear head takes the fused path; any other head (LoRA-wrapped,
    quantized, with bias) computes its logits and F.cross_entropy, with the same result.
    """
    if hidden.shape[:2] != labels.shape:  # e.g. a prepended soft prompt: labels must cover it too
        raise ValueError(f"labels {tuple(labels.shape)} do not cover the hidden states {tuple(hidden.shape[:2])}")
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)  # last position: no target
    flat = hidden.reshape(-1, hidden.shape[-1])
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(flat, head.weight, targets, ignore_index)
    logits = head(hidden[:, :-1]).flatten(0, 1)
    return F.cross_entropy(upcast(logits), labels[:, 1:].reshape(-1), ignore_index=ignore_index, reduction="sum")


def computes_own_loss(model: nn.Module) -> bool:
    """Whether model(..., labels=) returns the summed next-token loss: our model classes declare
    `computes_causal_lm_loss`; others (transformers' models) do not have the flag and return logits."""
    return getattr(model, "computes_causal_lm_loss", False) is True
