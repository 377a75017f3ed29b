"""What an adapter learned, per layer, computed in low rank: never the dense out x in matrix.

For dW = s * B @ A (B: (out, r), A: (r, in)), QR-factor B = Qb Rb and A^T = Qa Ra; then
dW = Qb (s Rb Ra^T) Qa^T, and the SVD of the r x r core gives dW's singular values exactly, and
its singular vectors as Qb U_c and Qa V_c: O((out + in) r^2) instead of O(out * in * min(out, in)).

Conv adapters (peftcore.lora.conv, HF PEFT's lora.Conv1d/2d/3d): A (r, in, *k) flattens to (r, in * prod k)
and B (out, r / groups, 1, ...) to (out, r), and their product is the adapter as one dense conv weight,
(out, in * prod k) with the kernel laid out as the base's. With groups == 1 that is the reshaped delta_weight
(out, in/groups * prod k). With groups > 1 the adapter is not grouped (A reads every input channel): B stands
for the block-diagonal (out, r) matrix of its g blocks, the spectra are those of the dense weight, and the
base is compared as the dense conv it equals (each group's weight in its diagonal block, zeros elsewhere).

Prompt-learning adapters: peftcore.analysis.prompts. The `peftcore inspect` command, which handles
both kinds: peftcore.jobs.inspect.

Statistics follow Hu et al. 2021 (LoRA), section 7: the subspace similarity
phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j) between the top right-singular vectors of two
adapters' A matrices, and the amplification factor ||dW||_F / ||U^T W V||_F with U, V the top-r
singular directions of dW (how much dW amplifies directions W itself does not emphasise).

Combined adapters (PeftModel.add_weighted_adapter) store more directions than dW has: "cat" is zero-padded to
r' = the sum of the adapters' largest ranks where a layer holds less (rank patterns, a module one adapter lacks),
and an svd type truncating a delta of rank < svd_rank keeps round-off directions (~1e-7 of sigma1, float32).
`numerical_rank` counts the directions above round-off; the amplification factor and the spectra plot use those
only (U^T W V over arbitrary directions of a zero singular value would measure nothing about dW).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from peftcore._json import json_safe  # NaN / inf -> null, as metrics.jsonl writes them
from peftcore.adapter_io import adapter_weights, read_adapter_config
from peftcore.analysis.base_weights import BaseCheckpoint, BaseKey
from peftcore.lora.conv import grouped_to_dense
from peftcore.lora.inject import pattern_value

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\."
                      r"(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lora_embedding_[AB])$")
ROUND_OFF = torch.finfo(torch.float32).eps


@dataclass
class LowRankSVD:
    U: torch.Tensor  # (out, r) left singular vectors
    S: torch.Tensor  # (r,) singular values, descending
    V: torch.Tensor  # (in, r) right singular vectors


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """The thin SVD of scale * B @ A from two QRs and an r x r SVD (float64 for the small core)."""
    Qb, Rb = torch.linalg.qr(B.double())  # (out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (in, r), (r, r)
    Uc, S, Vhc = torch.linalg.svd(scale * Rb @ Ra.T, full_matrices=False)
    return LowRankSVD(Qb @ Uc, S, Qa @ Vhc.T)


def effective_rank(S: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli 2007): 1 for rank one, r when flat,
    0 for dW = 0 (B still at its zero init): no direction at all, not one."""
    if not bool(S.sum() > 0):
        return 0.0
    p = S / S.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(S: torch.Tensor) -> float:
    """||dW||_F^2 / ||dW||_2^2: a rank that small singular values cannot inflate; 0 for dW = 0.
    Computed as sum (S / S[0])^2 so tiny singular values cannot underflow to 0 / 0."""
    if not bool(S[0] > 0):
        return 0.0
    return float(((S / S[0]) ** 2).sum())


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values of the (out, in) = `shape` delta rise above round-off: numpy's matrix_rank
    tolerance, sigma1 * max(out, in) * float32 eps (adapters are stored in float32 or narrower). 0 for dW = 0."""
    if S.numel() == 0 or not bool(S[0] > 0):
        return 0
    return int((S > S[0] * max(shape) * ROUND_OFF).sum())


def amplification_factor(svd: LowRankSVD, W: torch.Tensor) -> float:
    """||dW||_F / ||U^T W V||_F (LoRA paper, Table 7), with W (out, in); costs one (out, in, r) product. U, V: the
    directions above round-off (numerical_rank), not a combined adapter's zero padding, whose singular vectors are
    arbitrary. W.double() is a no-op for the float64 weight inspect_adapter passes: no second copy."""
    k = numerical_rank(svd.S, (svd.U.shape[0], svd.V.shape[0]))
    projected = svd.U[:, :k].T @ (W.double() @ svd.V[:, :k])  # (k, k)
    return float(torch.linalg.norm(svd.S) / torch.linalg.norm(projected).clamp_min(1e-300))


def right_singular_vectors(A: torch.Tensor) -> torch.Tensor:
    """A (r, in) -> (in, r): the right-singular directions the LoRA paper compares across adapters."""
    return torch.linalg.svd(A.double(), full_matrices=False).Vh.T


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi[i-1, j-1] = ||U1_i^T U2_j||_F^2 / min(i, j) for all i <= r1, j <= r2; values in [0, 1]."""
    U1, U2 = right_singular_vectors(A1), right_singular_vectors(A2)
    overlap = (U1.T @ U2) ** 2  # (r1, r2): squared cosines between directions
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ||U1_i^T U2_j||_F^2
    i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


@dataclass
class LayerStats:
    module: str
    rank: int
    scale: float
    delta_fro: float
    delta_spectral: float
    singular_values: list[float]
    effective_rank: float
    stable_rank: float
    norm_A: float
    norm_B: float
    relative_delta: float | None = None  # ||dW||_F / ||W||_F, with the base weight
    amplification: float | None = None
    magnitude_change: dict | None = None  # DoRA: m vs the base row norms
    numerical_rank: int | None = None  # singular values above round-off: < rank for a combined adapter's padding
    extra: dict = field(default_factory=dict)


@dataclass
class AdapterTensors:
    """One adapter's LoRA factors by module, as read from its files."""

    config: dict
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    magnitude: dict[str, torch.Tensor]

    def scale(self, module: str) -> float:
        """HF PEFT's scaling for this module: alpha (alpha_pattern aware) over r (or sqrt r, rsLoRA)."""
        r = self.A[module].shape[0]  # the saved factor is the truth; rank_pattern produced it
        alpha = pattern_value(module, self.config.get("alpha_pattern") or {}, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_adapter(folder: str | Path) -> AdapterTensors:
    """LoRA factors straight from an adapter folder (ours or HF PEFT's): no model needed."""
    config = read_adapter_config(folder)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r} has no LoRA factors; "
                         "prompt methods: inspect_prompt_adapter()")
    A, B, magnitude = {}, {}, {}
    _, _, tensors = adapter_weights(folder)  # safetensors, or an older PEFT save's adapter_model.bin
    for key, tensor in tensors:
        match = LORA_KEY.match(key)
        if match:
            # An embedding's lora_embedding_A (r, vocab) and _B (dim, r) give PEFT's delta (B A)^T, the (vocab, dim)
            # of its table: as an (out, in) = (vocab, dim) layer, A is _B^T and B is _A^T
            parts = {"lora_A.weight": (A, False), "lora_B.weight": (B, False), "lora_embedding_B": (A, True),
                     "lora_embedding_A": (B, True), "lora_magnitude_vector": (magnitude, False)}
            target, transposed = parts[match["part"]]
            target[match["module"]] = (tensor.T if transposed else tensor).float()
    if not A:
        raise ValueError(f"{folder}: no LoRA factors (lora_A / lora_B, lora_embedding_A / _B) in its weights")
    return AdapterTensors(config, A, B, magnitude)


def conv_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A conv adapter's A (r, in, *k) and B (out, r / g, 1, ...) as the factors (r, in * prod k) and (out, r) of
    its dense weight, and its groups g (read off the shapes: B holds r / g of the r channels). Linear: as is, 1."""
    if A.dim() <= 2:
        return A, B, 1
    r, per_group = A.shape[0], B.shape[1]
    if r % per_group or B.shape[0] % (r // per_group) or any(k != 1 for k in B.shape[2:]):
        raise ValueError(f"lora_B {tuple(B.shape)} does not fit lora_A {tuple(A.shape)}: a conv adapter's lora_B is "
                         "(out, r / groups, 1, ...)")
    groups = r // per_group
    return A.flatten(1), grouped_to_dense(B.flatten(1), groups), groups


def base_shape(A: torch.Tensor, B: torch.Tensor) -> tuple[int, ...]:
    """The base weight an adapter fits: (out, in) for a linear, the conv weight (out, in / groups, *k) for a conv."""
    if A.dim() <= 2:
        return B.shape[0], A.shape[1]
    groups = conv_factors(A, B)[2]
    return (B.shape[0], A.shape[1] // groups, *A.shape[2:])


def dense_conv_weight(W: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv weight (out, in / g, *k) as the (out, in * prod k) matrix of the dense conv it equals: group j's
    outputs read group j's inputs only, so its weight fills the j-th diagonal block."""
    if groups == 1:
        return W.flatten(1)
    per_out, per_in = W.shape[0] // groups, W.shape[1]
    dense = W.new_zeros(W.shape[0], groups * per_in, *W.shape[2:])
    for j in range(groups):
        dense[j * per_out:(j + 1) * per_out, j * per_in:(j + 1) * per_in] = W[j * per_out:(j + 1) * per_out]
    return dense.flatten(1)


def layer_stats(module: str, A: torch.Tensor, B: torch.Tensor, scale: float, W: torch.Tensor | None,
                magnitude: torch.Tensor | None) -> LayerStats:
    """One layer's numbers. A, B, W as the layer holds them: (r, in), (out, r), the (out, in) base weight, or
    a conv's (see conv_factors). W is converted to float64 once (a no-op when it already is), the only copy of
    it this makes (a grouped conv's: its dense form, groups times its size)."""
    A, B, groups = conv_factors(A, B)
    if W is not None and W.dim() > 2:
        W = dense_conv_weight(W, groups)
    svd = lowrank_svd(B, A, scale)
    S = svd.S
    stats = LayerStats(module, A.shape[0], scale, float(torch.linalg.norm(S)), float(S[0]), S.tolist(),
                       effective_rank(S), stable_rank(S), float(torch.linalg.norm(A)), float(torch.linalg.norm(B)),
                       numerical_rank=numerical_rank(S, (B.shape[0], A.shape[1])))
    if W is not None:
        W = W.double()
        stats.relative_delta = stats.delta_fro / float(torch.linalg.norm(W))
        stats.amplification = amplification_factor(svd, W)
        if magnitude is not None:
            base_norm = torch.linalg.vector_norm(W, dim=1)
            change = (magnitude.flatten() - base_norm) / base_norm.clamp_min(1e-12)  # a conv's: (1, out, 1, ...)
            stats.magnitude_change = {"mean": float(change.mean()), "max_abs": float(change.abs().max())}
    return stats


def inspect_adapter(folder: str | Path, base: str | Path | None = None) -> list[LayerStats]:
    """Per adapted layer statistics of the adapter in `folder` (base checkpoint: relative norms too)."""
    adapter = read_adapter(folder)
    modules = sorted(adapter.A, key=natural_key)
    if base is None:
        return [layer_stats(m, adapter.A[m], adapter.B[m], adapter.scale(m), None, adapter.magnitude.get(m))
                for m in modules]
    checkpoint = BaseCheckpoint(base)  # headers only; raises naming any module it cannot find, before any work
    keys = checkpoint.locate_all({m: base_shape(adapter.A[m], adapter.B[m]) for m in modules},
                                 bool(adapter.config.get("fan_in_fan_out")))
    return [stats_with_base(adapter, m, checkpoint, keys[m]) for m in modules]


def stats_with_base(adapter: AdapterTensors, module: str, checkpoint: BaseCheckpoint, key: BaseKey) -> LayerStats:
    """One layer against its base weight, read here and freed on return: one weight alive at a time."""
    W = checkpoint.read(key)
    return layer_stats(module, adapter.A[module], adapter.B[module], adapter.scale(module), W,
                       adapter.magnitude.get(module))


def compare_adapters(first: str | Path, second: str | Path) -> dict[str, list[list[float]]]:
    """phi grids for the modules both adapters adapt (their ranks may differ, their input widths may not;
    a conv's input is in * prod kernel)."""
    a, b = read_adapter(first), read_adapter(second)
    shared = sorted(set(a.A) & set(b.A), key=natural_key)
    if not shared:
        raise ValueError(f"{first} and {second} adapt no module in common")
    for m in shared:
        if a.A[m].shape[1:] != b.A[m].shape[1:]:
            raise ValueError(f"{m}: lora_A is {tuple(a.A[m].shape)} in {first} but {tuple(b.A[m].shape)} in {second}: "
                             "the adapters were trained on bases of different widths, their subspaces do not compare")
    return {m: subspace_similarity(a.A[m].flatten(1), b.A[m].flatten(1)).tolist() for m in shared}


def natural_key(name: str):
    """model.layers.10 after model.layers.9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def format_table(stats: list[LayerStats]) -> str:
    """One row per layer. ||A||/||B||: how the update's norm is split between the factors (B ~ 0 after
    init, so large early on); dm: DoRA's mean relative change of the magnitude vector vs W's row norms;
    r(dW): the directions dW has (numerical_rank), shown where some layer has fewer than its r (a combined
    adapter's zero padding, a B still at zero)."""
    dora = any(s.magnitude_change is not None for s in stats)
    padded = any(s.numerical_rank is not None and s.numerical_rank < s.rank for s in stats)
    head = (f"{'module':<44} {'r':>3}" + (f" {'r(dW)':>5}" if padded else "") + f" {'scale':>6} {'||dW||':>9} "
            f"{'||dW||/||W||':>12} {'sigma1':>9} {'eff.rank':>8} {'st.rank':>7} {'amplif.':>8} {'||A||/||B||':>11}"
            + (f" {'dm':>9}" if dora else ""))
    rows = [head, "-" * len(head)]
    for s in stats:
        rel = f"{s.relative_delta:12.3e}" if s.relative_delta is not None else f"{'-':>12}"
        amp = f"{s.amplification:8.2f}" if s.amplification is not None else f"{'-':>8}"
        balance = f"{s.norm_A / s.norm_B:11.3g}" if s.norm_B > 0 else f"{'inf':>11}"
        shown = f"{'-' if s.numerical_rank is None else s.numerical_rank:>5} " if padded else ""
        row = (f"{s.module[-44:]:<44} {s.rank:>3} {shown}{s.scale:6.3g} {s.delta_fro:9.3e} {rel} "
               f"{s.delta_spectral:9.3e} {s.effective_rank:8.2f} {s.stable_rank:7.2f} {amp} {balance}")
        if dora:
            row += f" {s.magnitude_change['mean']:+9.2e}" if s.magnitude_change is not None else f" {'-':>9}"
        rows.append(row)
    return "\n".join(rows)


def format_similarity(comparison: dict[str, list[list[float]]], first: str, second: str) -> str:
    """The phi grids in the terminal, one row per module: phi(1, 1) (do the top directions agree?),
    phi(k, k) for k = the smaller rank (do the whole subspaces?), and phi(1, j) at its best j (where in
    the other adapter the first one's top direction went). 1: the same subspace, ~k/d: random ones."""
    head = f"{'module':<44} {'r1 x r2':>7} {'phi(1,1)':>8} {'phi(k,k)':>8} {'max_j phi(1,j)':>14}"
    rows = [f"subspace similarity phi: {first} (rows) vs {second} (columns)", head, "-" * len(head)]
    for module, grid in comparison.items():
        k = min(len(grid), len(grid[0]))
        rows.append(f"{module[-44:]:<44} {f'{len(grid)}x{len(grid[0])}':>7} {grid[0][0]:8.3f} "
                    f"{grid[k - 1][k - 1]:8.3f} {max(grid[0]):14.3f}")
    return "\n".join(rows)


def write_json(stats: list[LayerStats], path: str | Path, comparison: dict | None = None,
               token_rows: list | None = None) -> Path:
    """Strict JSON: a non-finite number (a zero base weight's ratio) is written as null, never as NaN,
    which json.loads in other languages rejects."""
    payload = {"layers": [asdict(s) for s in stats]}
    if comparison is not None:
        payload["subspace_similarity"] = comparison
    if token_rows:  # trainable_token_indices: analysis.token_rows
        payload["token_rows"] = [asdict(s) for s in token_rows]
    Path(path).write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n")
    return Path(path)
