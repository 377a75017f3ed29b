"""One tolerance table per dtype (and backend), so no test carries its own magic numbers.

fp32 rows: the reference and ours do the same math in a different order (1e-5 covers K <= 4096).
fp16/bf16 rows: 10 / 7 mantissa bits; outputs are compared after an fp32-accumulated reference.
cuda_fp32: NVIDIA's default fp32 dot is tf32 (~3e-4 relative), the interpreter's is exact fp32.
fp32_deep: fp32 through a whole pretrained model, where per-layer reordering compounds: measured 5e-5
absolute on SmolLM2-135M's logits (30 layers, |logit| up to ~25) with an adapter applied by HF PEFT.
"""
import torch

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    "cuda_fp32": dict(atol=1e-3, rtol=1e-3),
    "fp32_deep": dict(atol=2e-4, rtol=1e-4),
}


def tol(dtype: torch.dtype, device: str = "cpu") -> dict:
    if dtype == torch.float32 and device == "cuda":
        return TOLERANCES["cuda_fp32"]
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **override) -> None:
    """torch.testing.assert_close with the row of `dtype` (default: actual's dtype)."""
    dtype = dtype or actual.dtype
    kwargs = {**tol(dtype, actual.device.type), **override}
    torch.testing.assert_close(actual, expected.to(actual.dtype), **kwargs)
