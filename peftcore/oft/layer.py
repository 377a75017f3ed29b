"""OFT layers, written by hand around the layer they adapt (the base-layer pattern), computing what HF PEFT
0.21.2's oft layers compute.

Each adapter holds a vector v per block (the upper triangle of a skew-symmetric S = U - U^T, b(b-1)/2 entries)
and builds a block-diagonal R from it:
    exact Cayley (use_cayley_neumann=False):  R = (I - S)(I + S)^-1
    Cayley-Neumann (default):                 R = I + 2S + 2S^2 + ... + 2S^(n-2) + S^(n-1)   (n terms)
The two are transposes of each other's ideal: the series approximates (I + S)(I - S)^-1 = ((I - S)(I + S)^-1)^T.
PEFT has it so, and a saved adapter means what it meant there.

OftLinear:    y = base(x R)           x's feature axis cut into blocks of b, each row-vector times its block
              merged: W <- W R^T      (out, in) @ (in, in)
OftEmbedding: y = E[ids] R            the embedding vectors are rotated
              merged: E <- E R

Parameter names and nesting equal PEFT's (`base_layer`, `oft_R.<name>.weight`, `oft_embedding_R.<name>.weight`,
each of shape (blocks, b(b-1)/2), blocks = 1 with block_share), so state dicts line up key for key.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from peftcore.lora.layer import adapter_dtype, base_output_stands, mixed_rows
from peftcore.models.quantized import QuantLinear
from peftcore.oft.config import OFTConfig


# -- the rotation's math ------------------------------------------------------------------------------
def skew_symmetric(vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """(n, b(b-1)/2) upper-triangle vectors -> (n, b, b) skew-symmetric S = U - U^T."""
    upper = vec.new_zeros(vec.shape[0], b, b)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def cayley(S: torch.Tensor) -> torch.Tensor:
    """(I - S)(I + S)^-1 per block: exactly orthogonal for skew S. Solved in at least fp32 (PEFT's identity is fp32,
    and linalg.solve has no half-precision CPU kernel), returned in S's dtype."""
    wide = torch.promote_types(S.dtype, torch.float32)
    eye = torch.eye(S.shape[-1], dtype=wide, device=S.device).expand_as(S)
    S = S.to(wide)
    # X (I + S) = I - S, solved on the right: no explicit inverse
    return torch.linalg.solve(eye + S, eye - S, left=False)


def neumann_coefficients(terms: int) -> list[float]:
    """The coefficient of S^k, k = 0, 1, ..., in PEFT 0.21.2's truncated series for (I + S)(I - S)^-1 =
    I + 2S + 2S^2 + ... . PEFT's loop ends on a single S^(n-1) and always keeps S^2 and S^3 once n >= 3,
    so 3 terms give the same series as 4."""
    if terms <= 1:
        return [1.0]
    if terms == 2:
        return [1.0, 2.0]
    return [1.0] + [2.0] * max(2, terms - 2) + [1.0]


def cayley_neumann(S: torch.Tensor, terms: int) -> torch.Tensor:
    """sum_k c_k S^k (neumann_coefficients), in S's dtype: batched matmuls only, no inverse. Orthogonal up to the
    series' truncation error, O(||S||^(n-1))."""
    coefficients = neumann_coefficients(terms)
    R = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).repeat(S.shape[0], 1, 1)
    power = None
    for c in coefficients[1:]:
        power = S if power is None else torch.bmm(power, S)
        R = R + c * power
    return R


def coft_project(vec: torch.Tensor, eps: float) -> torch.Tensor:
    """Constrained OFT: each block's S is pulled back onto the Frobenius ball of radius eps / sqrt(blocks) around 0,
    S <- S * min(1, radius / ||S||_F), which bounds how far R strays from I (PEFT's _project_batch). ||S||_F is
    sqrt(2) ||v||: every entry of v sits twice in S."""
    radius = eps / math.sqrt(vec.shape[0])
    norm = math.sqrt(2) * torch.linalg.vector_norm(vec, dim=1, keepdim=True)  # (n, 1)
    return vec * (radius / norm).clamp(max=1)  # norm 0 -> inf -> 1: the vector stays


def fit_blocks(features: int, r: int, block_size: int) -> tuple[int, int]:
    """(r, block_size) with r * block_size == features, from the one of them the config set. A value that does not
    divide `features` moves to the nearest divisor, with PEFT's warning and its tie rule (the lower one wins)."""
    given = block_size if r == 0 else r
    if features % given != 0 or given > features:
        fitted = nearest_divisor(features, given)
        warnings.warn(f"Invalid `{'oft_block_size' if r == 0 else 'r'}` ({given})! Adjusted it to ({fitted}) "
                      f"to divide the layer's {features} input features.")
        given = fitted
    other = features // given
    return (other, given) if r == 0 else (given, other)


def nearest_divisor(features: int, value: int) -> int:
    """PEFT's adjust_oft_parameters: the divisor of `features` nearest `value` (ties: the lower), `features` if
    value exceeds it."""
    if value >= features:
        return features
    higher = value
    while higher <= features and features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and features % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


class OftRotation(nn.Module):
    """One adapter's rotation (PEFT's OFTRotationModule, same attribute names: `weight` holds the vectors).

    weight: (r, b(b-1)/2), or (1, b(b-1)/2) with block_share; `in_features` = r_total * b is the width it rotates.
    """

    def __init__(self, r: int, n_elements: int, block_size: int, in_features: int, coft: bool = False,
                 eps: float = 6e-5, block_share: bool = False, use_cayley_neumann: bool = True,
                 num_cayley_neumann_terms: int = 5, dtype=None, device=None):
        super().__init__()
        self.r, self.n_elements, self.block_size, self.in_features = r, n_elements, block_size, in_features
        self.coft, self.eps, self.block_share = coft, eps, block_share
        self.use_cayley_neumann, self.num_cayley_neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.weight = nn.Parameter(torch.zeros(r, n_elements, dtype=dtype, device=device))
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        # not in the state dict (PEFT's are not either): they follow from block_size
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def blocks(self) -> torch.Tensor:
        """(r or 1, b, b) rotation blocks, in the weight's dtype. With coft, the stored vectors are first projected
        in place (no gradient), as PEFT does on every forward and merge: the constraint is a state, not a term."""
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(coft_project(self.weight, self.eps))
        return self.blocks_of(self.weight)

    def blocks_of(self, vec: torch.Tensor) -> torch.Tensor:
        """The rotation blocks these vectors give, in their dtype: (n, b(b-1)/2) -> (n, b, b)."""
        S = skew_symmetric(vec, self.rows, self.cols, self.block_size)
        if self.use_cayley_neumann:
            return cayley_neumann(S, self.num_cayley_neumann_terms)
        return cayley(S).to(vec.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x R along the last axis, in the weight's dtype: (..., in) -> (..., in)."""
        x = x.to(self.weight.dtype)
        R = self.blocks()
        shape = x.shape
        x = x.reshape(*shape[:-1], self.in_features // self.block_size, self.block_size)  # (..., blocks, b)
        if self.block_share:
            y = x @ R[0]  # one (b, b) block for every slice
        else:
            y = torch.einsum("...rk,rkc->...rc", x, R)  # slice j of x times block j
        return y.reshape(shape)

    def matrix(self) -> torch.Tensor:
        """The whole (in, in) block-diagonal R (PEFT's get_delta_weight). On CPU a half-precision adapter is expanded
        from an fp32 copy (CPU half matmuls are slow) and cast back, as PEFT does; its coft projection then stays
        with the copy (PEFT's too), the next forward stores it."""
        vec = self.weight
        if vec.device.type == "cpu" and vec.dtype in (torch.float16, torch.bfloat16):
            wide = vec.detach().float()
            R = self.blocks_of(coft_project(wide, self.eps) if self.coft else wide).to(vec.dtype)
        else:
            R = self.blocks()
        count = self.in_features // self.block_size
        return torch.block_diag(*(R[0 if self.block_share else i] for i in range(count)))


def new_rotation(features: int, config: OFTConfig, dtype: torch.dtype, device) -> tuple[OftRotation, int, int]:
    """-> (rotation, r, block_size) for a layer rotating `features` inputs, initialised as config.init_weights says."""
    r, block_size = fit_blocks(features, config.r, config.oft_block_size)
    rotation = OftRotation(1 if config.block_share else r, block_size * (block_size - 1) // 2, block_size, features,
                           config.coft, config.eps, config.block_share, config.use_cayley_neumann,
                           config.num_cayley_neumann_terms, dtype=dtype, device=device)
    if config.init_weights is False:  # PEFT's random start; True keeps the zeros: S = 0, R = I
        with torch.no_grad():
            rotation.weight.copy_(torch.randn(rotation.weight.shape, device=device) * 0.1)
    return rotation, r, block_size


def rotation_angle(layer: nn.Module, name: str) -> float:
    """How far adapter `name`'s R is from the identity: its largest principal angle, in radians in [0, pi].

    A rotation turns each of a set of orthogonal planes by an angle theta_j; its eigenvalues are e^(+-i theta_j).
    The largest |arg(eigenvalue)| over all blocks is the largest angle between any input x and its image x R:
    it is basis-free (the same whatever the block size), equals theta for a plane rotation by theta, is 0 for
    R = I, and, unlike ||R - I||_F, does not grow with the layer's width. The Cayley-Neumann R is only nearly
    orthogonal; the argument of its eigenvalues is still the turning part (their moduli carry the error)."""
    return float(block_angles(layer, name).max())


def block_angles(layer: nn.Module, name: str) -> torch.Tensor:
    """(blocks,) the largest principal angle of each distinct block of adapter `name` (see rotation_angle)."""
    return rotation_block_angles(layer.rotations[name])


def rotation_block_angles(rotation: OftRotation) -> torch.Tensor:
    """(blocks,) the largest principal angle of each block of `rotation` (see rotation_angle)."""
    with torch.no_grad():
        vec = rotation.weight.detach().double()  # fp64: angles near 0 need the precision
        if rotation.coft:  # what the next forward will use, without storing it (measuring changes nothing)
            vec = coft_project(vec, rotation.eps)
        R = rotation.blocks_of(vec)
        return torch.linalg.eigvals(R).angle().abs().amax(dim=-1).float()


# -- the per-adapter bookkeeping both layer types share --------------------------------------------------
def init_oft_state(layer: nn.Module, base_layer: nn.Module) -> None:
    """PEFT's attribute names (both dicts on every layer, as PEFT's OFTLayer: only one ever fills)."""
    layer.base_layer = base_layer
    layer.oft_R, layer.oft_embedding_R = nn.ModuleDict(), nn.ModuleDict()
    layer.r: dict[str, int] = {}
    layer.oft_block_size: dict[str, int] = {}
    layer.active_adapters: list[str] = []
    layer.merged_adapters: list[str] = []
    layer.disable_adapters = False


def add_rotation(layer: nn.Module, name: str, config: OFTConfig, weight: torch.Tensor, autocast_dtype: bool) -> None:
    """A new adapter on `layer`: float32 on a half-precision base with autocast_dtype (lora.adapter_dtype)."""
    if name in layer.merged_adapters:
        raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before replacing it")
    dtype = adapter_dtype(weight.dtype, autocast_dtype)
    rotation, r, block_size = new_rotation(layer.in_features, config, dtype, weight.device)
    layer.rotations[name] = rotation
    layer.r[name], layer.oft_block_size[name] = r, block_size
    layer.active_adapters = [name]


def delete_rotation(layer: nn.Module, name: str) -> None:
    if name in layer.merged_adapters:
        raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
    if name in layer.rotations:
        del layer.rotations[name]
    layer.r.pop(name, None)
    layer.oft_block_size.pop(name, None)
    layer.active_adapters = [a for a in layer.active_adapters if a != name]


def rotate(layer: nn.Module, t: torch.Tensor, adapter_names) -> torch.Tensor:
    """t rotated by every active adapter in turn (PEFT's loop: t R1 R2 ...), or row b by adapter_names[b] alone."""
    rotations = layer.rotations
    if adapter_names is not None:
        return mixed_rows(t, t, adapter_names, rotations, lambda _out, rows, name: rotations[name](rows))
    for name in layer.active_adapters:
        if name in rotations:
            t = rotations[name](t)
    return t


def pending_merges(layer: nn.Module, adapter_names: list[str] | None) -> list[str]:
    """The named adapters (default: the active ones) this layer has and has not merged yet."""
    names = layer.active_adapters if adapter_names is None else adapter_names
    if isinstance(names, str):
        raise TypeError(f"adapter_names must be a list of adapter names, got the str {names!r}")
    for name in names:
        if name in layer.merged_adapters:  # PEFT's check_adapters_to_merge warns and skips it too
            warnings.warn(f"adapter {name!r} is already merged into {type(layer.base_layer).__name__}: nothing to do")
    return [n for n in names if n in layer.rotations and n not in layer.merged_adapters]


def inverse_matrix(rotation: OftRotation) -> torch.Tensor:
    """R^-1 in the adapter's dtype, inverted in fp32 (PEFT's unmerge). The true inverse, not R^T: the Cayley-Neumann
    R is not exactly orthogonal, and unmerge must undo merge. Inverted blockwise ((b, b) blocks, O(in b^2) work
    instead of O(in^3)), which is the same matrix: a block-diagonal matrix inverts block by block."""
    with torch.no_grad():
        R = rotation.matrix()
        b = rotation.block_size
        blocks = torch.stack([R[i:i + b, i:i + b] for i in range(0, R.shape[0], b)]).float()
        return torch.block_diag(*torch.linalg.inv(blocks)).to(R.dtype)


# -- the layers ---------------------------------------------------------------------------------------------
class OftLinear(nn.Module):
    """OFT around an nn.Linear or a QuantLinear (forward only: a quantized weight is not rotated in place)."""

    is_adapter_wrapper = True  # lora.modules_to_save.walk_unwrapped: the base layer inside is no target of its own

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        init_oft_state(self, base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @property
    def rotations(self) -> nn.ModuleDict:
        return self.oft_R

    def base_weight(self) -> torch.Tensor:
        """(out, in), dense."""
        base = self.base_layer
        return base.dequantize() if isinstance(base, QuantLinear) else base.weight

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: OFTConfig, autocast_dtype: bool = True) -> None:
        add_rotation(self, name, config, self.base_weight(), autocast_dtype)

    def delete_adapter(self, name: str) -> None:
        delete_rotation(self, name)

    def adapter_params(self, name: str):
        if name in self.oft_R:
            yield self.oft_R[name].weight

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        if base_output_stands(self, adapter_names):
            return self.base_layer(x)
        dtype = x.dtype  # the rotation runs in the adapter's dtype, the base in the input's (PEFT's casts)
        return self.base_layer(rotate(self, x, adapter_names).to(dtype)).to(dtype)

    # -- merging (the Adapter protocol) ---------------------------------------------------------
    def rotation_matrix(self, name: str) -> torch.Tensor:
        """The (in, in) block-diagonal R of adapter `name`: the forward feeds the base x R."""
        return self.oft_R[name].matrix()

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging `name` alone adds to the (out, in) base weight as it is now: W R^T - W (OFT multiplies; this
        is the difference, for code that compares adapters additively)."""
        W = self.base_weight().detach()
        R = self.rotation_matrix(name).detach()
        wide = torch.promote_types(W.dtype, R.dtype)
        return (W.to(wide) @ R.to(wide).T) - W.to(wide)

    def check_mergeable(self, names: list[str]) -> None:
        if isinstance(self.base_layer, QuantLinear):
            raise TypeError("cannot merge OFT into a quantized base layer in place; use the adapter unmerged")

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W <- W R^T for each adapter, last named first, so the merged layer computes what the forward computes with
        these adapters active in this order: base(x R1 R2) = x R1 R2 W^T = x (W R2^T R1^T)^T. (HF PEFT 0.21.2 merges
        first named first, W R1^T R2^T, which differs from its own forward when two rotations do not commute.)"""
        names = pending_merges(self, adapter_names)
        self.check_mergeable(names)
        W = self.base_layer.weight
        for name in reversed(names):
            R = self.rotation_matrix(name).detach()  # (in, in), the adapter's dtype
            with torch.no_grad():
                W.copy_((R @ W.T.to(R.dtype)).T)  # in the adapter's dtype, as PEFT: R W^T, transposed back
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W <- W R^-T, last merged first: the exact inverse of merge (up to rounding)."""
        W = self.base_layer.weight
        while self.merged_adapters:
            inverse = inverse_matrix(self.oft_R[self.merged_adapters.pop()])
            with torch.no_grad():
                W.copy_((inverse @ W.T.to(inverse.dtype)).T)


class OftEmbedding(nn.Module):
    """OFT on an nn.Embedding: the looked-up vectors are rotated, E[ids] R (the width rotated is embedding_dim)."""

    is_adapter_wrapper = True

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        init_oft_state(self, base_layer)
        # PEFT's names: in_features is the width that is rotated
        self.in_features, self.out_features = base_layer.embedding_dim, base_layer.num_embeddings

    @property
    def rotations(self) -> nn.ModuleDict:
        return self.oft_embedding_R

    def add_adapter(self, name: str, config: OFTConfig, autocast_dtype: bool = True) -> None:
        add_rotation(self, name, config, self.base_layer.weight, autocast_dtype)

    def delete_adapter(self, name: str) -> None:
        delete_rotation(self, name)

    def adapter_params(self, name: str):
        if name in self.oft_embedding_R:
            yield self.oft_embedding_R[name].weight

    def forward(self, ids: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        out = self.base_layer(ids)
        if base_output_stands(self, adapter_names):
            return out
        return rotate(self, out, adapter_names).to(out.dtype)

    def rotation_matrix(self, name: str) -> torch.Tensor:
        return self.oft_embedding_R[name].matrix()

    def delta_weight(self, name: str) -> torch.Tensor:
        """E R - E, (vocab, dim): the embedding table's layout."""
        E = self.base_layer.weight.detach()
        R = self.rotation_matrix(name).detach()
        wide = torch.promote_types(E.dtype, R.dtype)
        return E.to(wide) @ R.to(wide) - E.to(wide)

    def check_mergeable(self, names: list[str]) -> None:
        """A dense embedding table always takes its rotations."""

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """E <- E R for each adapter in order: the forward's E[ids] R1 R2 (here PEFT's order and its forward agree)."""
        E = self.base_layer.weight
        for name in pending_merges(self, adapter_names):
            R = self.rotation_matrix(name).detach()
            with torch.no_grad():
                E.copy_(E.to(R.dtype) @ R)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        E = self.base_layer.weight
        while self.merged_adapters:
            inverse = inverse_matrix(self.oft_embedding_R[self.merged_adapters.pop()])
            with torch.no_grad():
                E.copy_(E.to(inverse.dtype) @ inverse)


OFT_LAYERS = (OftLinear, OftEmbedding)
