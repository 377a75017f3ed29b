"""LoKr (low-rank Kronecker product, LyCORIS) around an nn.Linear, nn.Conv1d or nn.Conv2d.

    delta W = kron(w1, w2) * alpha / r       w1 (a, c), w2 (b, d): out = a * b, in = c * d
    y       = base(x) + x delta W^T          (a conv runs x through delta W as the base does)

(a, b) = factorization(out), (c, d) = factorization(in). w2 is stored whole (`lokr_w2`) unless r is small
against it, r < max(b, d) / 2, then as lokr_w2_a @ lokr_w2_b (rank r); w1 likewise, but only with decompose_both.
On convs w2 carries the kernel: (b, d, kh, kw) whole, (b, r) @ (r, d*kh*kw) low-rank, or with
use_effective_conv2d a CP decomposition lokr_t2 (r, r, kh, kw) with modes lokr_w2_a (r, b), lokr_w2_b (r, d).
Parameter names and nesting are PEFT's (`lokr_w1.<adapter>`, `lokr_w2_a.<adapter>`, ...).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peftcore.lycoris import common
from peftcore.lycoris.config import LoKrConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m * n = dimension, as LyCORIS (and PEFT) do.

    factor > 0 dividing `dimension`: (factor, dimension // factor), unsorted. Otherwise walk the divisors m
    upwards (n = dimension // m) while m < n, and no further than `factor` (-1: no limit) -- the walk stops at the
    pair nearest the square root -- and return it sorted. 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127);
    128, factor 4 -> (4, 32); 128, factor 3 -> (2, 64).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        next_m = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if next_m > limit:
            break
        m, n = next_m, dimension // next_m  # may step one past the square root: the sort below undoes it
    return min(m, n), max(m, n)


def lokr_plan(base: nn.Module, r: int, config: LoKrConfig) -> dict:
    """PEFT's update_layer choices for this base: the Kronecker sides, the kernel, and which factors are whole."""
    if isinstance(base, nn.Linear):
        in_dim, out_dim, kernel = base.in_features, base.out_features, ()
    else:
        in_dim, out_dim, kernel = base.in_channels // base.groups, base.out_channels, tuple(base.kernel_size)
    out_l, out_k = factorization(out_dim, config.decompose_factor)  # w1 rows, w2 rows
    in_m, in_n = factorization(in_dim, config.decompose_factor)  # w1 columns, w2 columns
    return dict(
        w1=(out_l, in_m), w2=(out_k, in_n), kernel=kernel,
        use_w1=not (config.decompose_both and r < max(out_l, in_m) / 2),
        use_w2=not r < max(out_k, in_n) / 2,
        # a kernel of size 1 is a plain matrix product: no CP form (PEFT skips it the same way)
        effective=bool(kernel) and config.use_effective_conv2d and any(k != 1 for k in kernel),
    )


def factor_shapes(r: int, plan: dict) -> dict[str, tuple[int, ...]]:
    """PEFT's parameter shapes, in the order PEFT initialises them (w1 side, w2 side, t2)."""
    (a, c), (b, d), kernel = plan["w1"], plan["w2"], plan["kernel"]
    shapes = {"lokr_w1": (a, c)} if plan["use_w1"] else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    if plan["use_w2"]:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif plan["effective"]:
        # a Conv1d kernel (k,) is stored as (k, 1) so the 2-D CP rebuild serves both (PEFT's layout)
        shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *kernel, *(1,) * (2 - len(kernel))))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
    return shapes


# init_weights -> the factors that start at zero (the rest: kaiming uniform). True zeroes the w1 side, "lycoris"
# (the LyCORIS repository's way) the w2 side; either makes kron(w1, w2) = 0, the identity adapter.
ZEROED = {True: {"lokr_w1", "lokr_w1_a"}, False: set(), "lycoris": {"lokr_w2", "lokr_w2_b"}}


def lokr_tensors(r: int, plan: dict, init_weights: bool | str) -> dict[str, torch.Tensor]:
    """The initialised factors; zeros draw nothing from the RNG, so drawing the rest in PEFT's order makes a
    seeded init equal PEFT's."""
    zeroed = ZEROED[init_weights]
    tensors = {}
    for key, shape in factor_shapes(r, plan).items():
        tensors[key] = nn.init.zeros_(common.empty(*shape)) if key in zeroed else common.kaiming_(common.empty(*shape))
    return tensors


def kron_delta(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2); with a 4-D w2 (a conv kernel) w1 gets two unit kernel axes first. A 3-D w2 (Conv1d, whole)
    meets a 2-D w1, which torch.kron pads in front: PEFT 0.21.2's layout, kept so its adapters load."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # Standard strides, not just .contiguous(): the CP einsum returns a unit kernel axis (Conv1d's (k, 1), a (k, 1)
    # Conv2d kernel) with an odd stride that .contiguous() keeps and torch.kron's internal view rejects -- PEFT
    # 0.21.2 crashes there. A flat view and back gives the same numbers with standard strides (no copy if dense).
    w2 = w2.contiguous().reshape(-1).view(w2.shape)
    return torch.kron(w1, w2)


class LoKrLayer(nn.Module):
    """LoKr adapters (one or several, by name) around an nn.Linear, nn.Conv1d or nn.Conv2d."""

    PARAM_DICTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # PEFT's
    is_adapter_wrapper = True  # lora.modules_to_save.walk_unwrapped: the insides are no targets of their own

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        common.init_lycoris_state(self, base_layer)
        for attribute in self.PARAM_DICTS:
            setattr(self, attribute, nn.ParameterDict())

    def add_adapter(self, name: str, config: LoKrConfig, r: int, alpha: float, autocast_dtype: bool = True) -> None:
        """`autocast_dtype`: float32 factors on a half-precision base (lora.layer.adapter_dtype), as PEFT."""
        common.record_adapter(self, name, r, alpha, config)
        plan = lokr_plan(self.base_layer, r, config)
        common.place(self, lokr_tensors(r, plan, config.init_weights), name, autocast_dtype)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        common.delete_adapter(self, name)

    def adapter_params(self, name: str):
        yield from common.adapter_params(self, name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) of adapter `name`, rebuilt from their low-rank or CP forms where stored so."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:  # t2 (r, r, kh, kw), modes w2_a (r, b), w2_b (r, d) -> (b, d, kh, kw)
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", self.lokr_t2[name], self.lokr_w2_a[name],
                              self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]  # (b, r) @ (r, d [* kernel])
        return w1, w2

    def weight_delta(self, name: str, rank_dropout: bool = False) -> torch.Tensor:
        """delta W in the base weight's shape; rank_dropout (training): PEFT's row mask, rescaled only with
        rank_dropout_scale."""
        delta = (kron_delta(*self.factors(name)) * self.scaling[name]).reshape(self.base_layer.weight.shape)
        if rank_dropout:
            delta = common.drop_rows(delta, self.rank_dropout[name], rescale=self.rank_dropout_scale[name],
                                     mask_dtype=torch.float32)
        return delta

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter `name` adds to the base weight (no dropout), in the base weight's shape."""
        return self.weight_delta(name)

    def check_mergeable(self, names: list[str]) -> None:
        """A dense Linear / Conv weight (the only bases LoKr takes) always takes the delta."""

    def merge(self, adapter_names: list[str] | None = None) -> None:
        common.merge(self, adapter_names)

    def unmerge(self) -> None:
        common.unmerge(self)

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        return common.lycoris_forward(self, x, adapter_names)
