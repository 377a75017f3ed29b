"""How a new LoRA adapter starts: HF PEFT's `init_lora_weights` schemes.

True: A kaiming-uniform(a=sqrt 5), B zero (output == base). "gaussian": A ~ N(0, 1/r), B zero.
False: both keep nn.Linear's random init (tests use it: the adapter must change the output).
"pissa" / "pissa_niter_K": A, B from the top-r singular triplets of W, and W keeps the residual.
"olora": A, B from the QR decomposition of W, and W keeps the residual.
"loftq": A, B from the SVD of W minus its quantized copy, and W becomes that copy (peftcore.lora.loftq).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peftcore.lora.loftq import init_loftq
from peftcore.models.quantized import QuantLinear

# The schemes that draw A and B without reading the base weight: the only ones a layer whose weight is no plain
# (out, in) matrix takes (a conv kernel, nn.MultiheadAttention's packed in_proj, a bare MoE parameter).
PLAIN_INITS = (True, False, "gaussian")


def init_adapter(layer, name: str, scheme: bool | str, loftq_config: dict | None = None) -> None:
    """`loftq_config`: the LoraConfig's, which scheme "loftq" needs (its bits and steps)."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    if scheme is False:
        return
    if scheme is True or scheme == "gaussian":
        with torch.no_grad():
            if scheme is True:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(A.weight, std=1 / layer.r[name])
            nn.init.zeros_(B.weight)
            if B.bias is not None:
                nn.init.zeros_(B.bias)
        return
    if scheme == "loftq":
        return init_loftq(layer, name, loftq_config)
    check_scheme(scheme)
    if isinstance(layer.base_layer, QuantLinear):
        raise TypeError(f"init_lora_weights={scheme!r} rewrites the base weight: initialise before quantizing")
    r, (n_out, n_in) = layer.r[name], (layer.out_features, layer.in_features)
    if r > min(n_out, n_in):
        raise ValueError(f"init_lora_weights={scheme!r} takes the top r of a {n_out}x{n_in} weight: "
                         f"r={r} must be <= {min(n_out, n_in)}")
    with torch.no_grad():
        W = layer.base_layer.weight
        W_out_in = (W.T if layer.fan_in_fan_out else W).float()
        A_init, B_init = (olora_factors(W_out_in, layer.r[name]) if scheme == "olora"
                          else pissa_factors(W_out_in, layer.r[name], layer.scaling[name], scheme))
        A.weight.copy_(A_init)
        B.weight.copy_(B_init)
        residual = W_out_in - layer.scaling[name] * B_init @ A_init
        W.copy_((residual.T if layer.fan_in_fan_out else residual).to(W.dtype))


def check_scheme(scheme) -> None:
    if not isinstance(scheme, str) or not (scheme == "olora" or scheme.startswith("pissa")):
        raise ValueError(f"init_lora_weights={scheme!r}: "
                         "expected True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora' or 'loftq'")
    if scheme.startswith("pissa") and scheme != "pissa" and not scheme.removeprefix("pissa_niter_").isdigit():
        raise ValueError(f"init_lora_weights={scheme!r}: expected 'pissa' or 'pissa_niter_<int>'")


def pissa_factors(W: torch.Tensor, r: int, scaling: float, scheme: str):
    """W (out, in) ~ U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so s*B*A = the top-r part."""
    if scheme == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=int(scheme.removeprefix("pissa_niter_")))
        Vh = V.T
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]


def olora_factors(W: torch.Tensor, r: int):
    """W (out, in) = Q R: B = Q[:, :r] (orthonormal columns), A = R[:r]."""
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()
