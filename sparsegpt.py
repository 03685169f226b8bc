"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS updates, jointly with quantization.

Math only: tensors in, tensors out; no modules, no printing, no device moves. The caller writes the
returned weight back. Plain GPTQ is ``sparsity=0`` with a grid; plain pruning is ``grid=None``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from quant import QGrid, quantize

STATS_DTYPE = torch.float32
CHOLESKY_RETRIES = 3  # each retry multiplies the damping by 10


class CholeskyError(RuntimeError):
    """The damped Hessian stayed indefinite after every retry."""


class InputStats:
    """Streaming statistics of a linear layer's inputs: sum x x^T, sum x and the token count.

    They give the Hessian of the layer-wise loss, H = 2/n * sum x x^T, and the channel covariance
    for the MI estimate, cov = sum x x^T / n - mu mu^T, from one pass. Accumulated in float32.
    """

    def __init__(self, columns: int, device: torch.device | str):
        self.sum_xxT = torch.zeros(columns, columns, dtype=STATS_DTYPE, device=device)  # [in, in]
        self.sum_x = torch.zeros(columns, dtype=STATS_DTYPE, device=device)             # [in]
        self.num_samples = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [..., in] inputs of one batch."""
        x = x.reshape(-1, x.shape[-1]).to(STATS_DTYPE)
        if not torch.isfinite(x).all():
            raise ValueError("NaN or Inf in layer inputs (activations overflowed or the model is broken)")
        self.sum_xxT.addmm_(x.T, x)
        self.sum_x += x.sum(dim=0)
        self.num_samples += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n * sum x x^T, [in, in] float32."""
        if self.num_samples == 0:
            raise ValueError("no inputs were accumulated")
        return self.sum_xxT * (2.0 / self.num_samples)


@dataclass
class SolveResult:
    weight: torch.Tensor   # [out, in] in the input's dtype
    mask: torch.Tensor     # [out, in] bool, True where pruned
    damp: float            # the damping that made H positive definite


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (so that H^-1 = U^T U), with damping retries.

    damp starts at percdamp * mean(diag H) and is multiplied by 10 on each failure.
    """
    damp = percdamp * torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(CHOLESKY_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        damp *= 10
    raise CholeskyError(f"{name or 'layer'}: Hessian not positive definite even with damping {damp / 10:.3g}")


def _block_mask(W: torch.Tensor, d: torch.Tensor, sparsity: float, row_splits: Sequence[int]) -> torch.Tensor:
    """Adaptive mask of one block: prune the lowest saliency w^2 / [H^-1]_jj^2 in each row segment.

    W: [out, cols], d: [cols] diagonal of the inverse-Hessian factor. Exactly
    int(segment.numel() * sparsity) weights of each segment are pruned.
    """
    saliency = W ** 2 / d.unsqueeze(0) ** 2
    mask = torch.zeros_like(W, dtype=torch.bool)
    start = 0
    for rows in row_splits:
        seg = saliency[start:start + rows].reshape(-1)
        k = int(seg.numel() * sparsity)
        if k > 0:
            mask[start:start + rows].view(-1)[torch.topk(seg, k, largest=False).indices] = True
        start += rows
    return mask


def sparsegpt_solve(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.0, prune_n: int = 0,
                    prune_m: int = 0, block_size: int = 128, percdamp: float = 0.01,
                    grid: Optional[QGrid] = None, row_splits: Optional[Sequence[int]] = None,
                    name: str = "") -> SolveResult:
    """Prune W to ``sparsity`` (or N:M) and quantize it on ``grid`` in one pass of blocked OBS updates.

    W: [out, in], H: [in, in] (float32; float64 in gives a float64 computation). Section 3 of the
    paper: columns are processed left to right; within a block of ``block_size`` columns the mask
    is chosen adaptively, each column is pruned/quantized and its error spread to the columns on its
    right, err = (w - q) / U_jj,  W[:, j:] -= err U[j, j:],  and the block's errors update the
    remaining columns at once. ``row_splits`` lists the row counts of fused sub-layers (q/k/v): the
    mask is chosen per segment, so one fused call equals separate calls.
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match W {tuple(W.shape)}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if prune_n and (prune_n > prune_m or block_size % prune_m):
        raise ValueError(f"N:M needs N <= M and M dividing block_size, got {prune_n}:{prune_m}, {block_size}")
    row_splits = list(row_splits or [rows])
    if sum(row_splits) != rows:
        raise ValueError(f"row_splits {row_splits} do not add up to {rows} rows")
    compute = torch.float64 if W.dtype == torch.float64 else torch.float32
    W_in_dtype = W.dtype
    W = W.to(compute).clone()
    H = H.to(compute).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U, damp = inverse_hessian_factor(H, percdamp, name)  # H^-1 = U^T U, U: [in, in] upper
    del H

    mask = torch.zeros_like(W, dtype=torch.bool)
    for block_start in range(0, cols, block_size):
        block_end = min(block_start + block_size, cols)
        count = block_end - block_start
        W_block = W[:, block_start:block_end].clone()
        Q_block = torch.zeros_like(W_block)
        err_block = torch.zeros_like(W_block)
        U_block = U[block_start:block_end, block_start:block_end]
        d = torch.diag(U_block)
        if grid is not None:
            # With an integer zero point, scale * (clamp(round(w / scale) + zero, 0, maxq) - zero)
            # = scale * clamp(round(w / scale), -zero, maxq - zero): four kernels per column.
            block_grid = grid.columns(block_start, block_end)
            scale, lo, hi = block_grid.scale, -block_grid.zero, block_grid.maxq - block_grid.zero
            passthrough = block_grid.maxq == 0          # 16-bit weights stay as they are
            any_passthrough = bool(passthrough.any())
        if prune_n == 0 and sparsity > 0:
            mask_block = _block_mask(W_block, d, sparsity, row_splits)
        else:
            mask_block = torch.zeros_like(W_block, dtype=torch.bool)
        for j in range(count):
            if prune_n and j % prune_m == 0:
                # saliency_ij = w_ij^2 / U_jj^2 over the next M columns; prune the N lowest of each row.
                saliency = W_block[:, j:j + prune_m] ** 2 / d[j:j + prune_m].unsqueeze(0) ** 2
                lowest = torch.topk(saliency, prune_n, dim=1, largest=False).indices
                mask_block.scatter_(1, j + lowest, True)
            w = W_block[:, j]
            q = w.masked_fill(mask_block[:, j], 0)
            if grid is not None:
                quantized = torch.clamp(torch.round(q / scale[:, j]), lo[:, j], hi[:, j]).mul_(scale[:, j])
                q = torch.where(passthrough[:, j], q, quantized) if any_passthrough else quantized
            Q_block[:, j] = q
            col_err = (w - q).div_(d[j])
            W_block[:, j:].addr_(col_err, U_block[j, j:], alpha=-1)
            err_block[:, j] = col_err
        W[:, block_start:block_end] = Q_block
        mask[:, block_start:block_end] = mask_block
        W[:, block_end:] -= err_block @ U[block_start:block_end, block_end:]
    return SolveResult(W.to(W_in_dtype), mask, damp)


def prune_mask(scores: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0,
               per_row: bool = False) -> torch.Tensor:
    """True where the lowest scores are pruned: N:M per group of M columns, else ``sparsity`` of each
    row (per_row) or of the whole matrix. scores: [out, in]."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if prune_n:
        groups = scores.reshape(rows, cols // prune_m, prune_m)
        lowest = torch.topk(groups, prune_n, dim=2, largest=False).indices
        return mask.reshape(rows, cols // prune_m, prune_m).scatter_(2, lowest, True).reshape(rows, cols)
    if per_row:
        k = int(cols * sparsity)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
        return mask
    k = int(scores.numel() * sparsity)
    if k:
        mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return mask


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W|: the magnitude-pruning baseline (pruned per layer)."""
    return W.abs().float()


def wanda_scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, pruned per output row. ||X_j|| = sqrt(H_jj n / 2)
    up to a constant factor, which does not change the ranking within a row."""
    return W.abs().float() * torch.sqrt(torch.diag(H).float()).unsqueeze(0)
