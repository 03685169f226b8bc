"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS updates, jointly with quantization.

Math only: tensors in, tensors out; no modules, no printing, no device moves. The caller writes the
returned weight back. Plain GPTQ is ``sparsity=0`` with a grid; plain pruning is ``grid=None``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import obs_kernel
from quant import QGrid

STATS_DTYPE = torch.float32
STATS_CHUNK = 16384  # tokens per Gram-matrix GEMM of InputStats (one batch of 8 x 2048)
CHOLESKY_RETRIES = 3  # each retry multiplies the damping by 10


class CholeskyError(RuntimeError):
    """The damped Hessian stayed indefinite after every retry."""


class InputStats:
    """Streaming statistics of a linear layer's inputs: sum x x^T, sum x and the token count.

    They give the Hessian of the layer-wise loss, H = 2/n * sum x x^T, and the channel covariance
    for the MI estimate, cov = sum x x^T / n - mu mu^T, from one pass. Sums are float32. Inputs are
    taken ``chunk`` tokens at a time (both sums: batches of whole chunks give the same sums whatever
    their size): on CUDA, fp16/bf16 chunks go through tensor-core GEMMs whose
    products are exact and whose float32 accumulation covers one chunk; the chunks' sums are then
    added in float32 (a single GEMM over all tokens accumulates far worse). Elsewhere each chunk is
    cast to float32 first, so the float32 copy is never larger than one chunk.
    """

    def __init__(self, columns: int, device: torch.device | str, chunk: int = STATS_CHUNK):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {chunk}")
        self.sum_xxT = torch.zeros(columns, columns, dtype=STATS_DTYPE, device=device)  # [in, in]
        self.sum_x = torch.zeros(columns, dtype=STATS_DTYPE, device=device)             # [in]
        self.num_samples = 0
        self.chunk = chunk

    def add(self, x: torch.Tensor) -> None:
        """x: [..., in] inputs of one batch."""
        x = x.reshape(-1, x.shape[-1])
        tensor_cores = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        for start in range(0, x.shape[0], self.chunk):   # chunk by chunk: the sums do not depend on the batch size
            part = x[start:start + self.chunk]                                        # [chunk, in]
            self.sum_x += part.sum(dim=0, dtype=STATS_DTYPE)
            if tensor_cores:
                _add_gram_low_precision(self.sum_xxT, part)
            else:
                part = part.to(STATS_DTYPE)
                self.sum_xxT.addmm_(part.T, part)
        self.num_samples += x.shape[0]

    def check(self) -> None:
        """Raise ValueError if any input so far was NaN or Inf (one host read: call it once per pass, not per batch).

        diag(sum x x^T) = sum of squares: finite exactly when every input was (and no square
        overflowed), and a non-finite entry stays non-finite whatever is added later.
        """
        if self.sum_xxT is not None and not bool(torch.isfinite(self.sum_xxT.diagonal()).all()):
            raise ValueError("NaN or Inf in layer inputs (activations overflowed or the model is broken)")

    def hessian(self, release: bool = False) -> torch.Tensor:
        """H = 2/n * sum x x^T, [in, in] float32.

        release=True scales the sums in place and hands them over (no second [in, in] matrix); the
        stats are empty afterwards.
        """
        if self.num_samples == 0:
            raise ValueError("no inputs were accumulated")
        self.check()
        if not release:
            return self.sum_xxT * (2.0 / self.num_samples)
        H = self.sum_xxT.mul_(2.0 / self.num_samples)
        self.sum_xxT, self.sum_x, self.num_samples = None, None, 0
        return H


# How the installed torch adds a half-precision Gram matrix into a float32 sum: "addmm" (one GEMM
# that accumulates into the sum), "mm" (a float32 product, then an add) or "float32" (cast first).
_gram_mode: Optional[str] = None


def _add_gram_low_precision(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x for fp16/bf16 x [n, in] on CUDA, with float32 accumulation (``out_dtype``, torch >= 2.8)."""
    global _gram_mode
    for mode in ("addmm", "mm", "float32"):
        if _gram_mode not in (None, mode):
            continue
        try:
            if mode == "addmm":
                torch.addmm(acc, x.T, x, out_dtype=STATS_DTYPE, out=acc)
            elif mode == "mm":
                acc += torch.mm(x.T, x, out_dtype=STATS_DTYPE)
            else:
                x = x.to(STATS_DTYPE)
                acc.addmm_(x.T, x)
        except (TypeError, RuntimeError, NotImplementedError):
            if mode == "float32":
                raise
            continue
        _gram_mode = mode
        return


@dataclass
class SolveResult:
    weight: torch.Tensor   # [out, in] in the input's dtype
    mask: torch.Tensor     # [out, in] bool, True where pruned
    damp: float            # the damping that made H positive definite


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (so that H^-1 = U^T U), with damping retries.

    damp starts at percdamp * mean(diag H) and is multiplied by 10 on each failure. With P the
    reversal of rows and columns, P H P = L L^T gives H = R R^T with R = P L P upper triangular, so
    H^-1 = R^-T R^-1 and U = R^-1: one Cholesky and one triangular solve, instead of a Cholesky, an
    inverse from it and a second Cholesky.
    """
    damp = percdamp * torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(CHOLESKY_RETRIES + 1):
        H_rev = H.flip((0, 1))                       # P H P (a copy)
        H_rev.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(H_rev)
        del H_rev
        if info == 0:
            R = L.flip((0, 1))                       # upper, H + damp I = R R^T
            del L
            U = torch.linalg.solve_triangular(R.T, eye, upper=False).T   # (R^-T)^T: U with contiguous rows
            if torch.isfinite(U).all():
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
            mask[start:start + rows].view(-1).index_fill_(0, torch.topk(seg, k, largest=False, sorted=False).indices, True)
        start += rows
    return mask


def sparsegpt_solve(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.0, prune_n: int = 0,
                    prune_m: int = 0, block_size: int = 128, percdamp: float = 0.01,
                    grid: Optional[QGrid] = None, row_splits: Optional[Sequence[int]] = None,
                    name: str = "", fused: Optional[bool] = None) -> SolveResult:
    """Prune W to ``sparsity`` (or N:M) and quantize it on ``grid`` in one pass of blocked OBS updates.

    W: [out, in], H: [in, in] (float32; float64 in gives a float64 computation). Section 3 of the
    paper: columns are processed left to right; within a block of ``block_size`` columns the mask
    is chosen adaptively, each column is pruned/quantized and its error spread to the columns on its
    right, err = (w - q) / U_jj,  W[:, j:] -= err U[j, j:],  and the block's errors update the
    remaining columns at once. ``row_splits`` lists the row counts of fused sub-layers (q/k/v): the
    mask is chosen per segment, so one fused call equals separate calls.

    ``fused``: run each block's column loop as one Triton launch (``obs_kernel``) instead of the
    PyTorch loop. None (default) = fused on CUDA when Triton is there, the plain loop elsewhere. The
    kernel rounds every product and sum on its own as the loop does (no FMA contraction), so both
    give the same masks and weights (on the H100 for one Vicuna-13B-shaped layer: identical masks,
    zero weight difference). fused=True on the CPU runs the kernel in Triton's interpreter
    (TRITON_INTERPRET=1; tests).
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
    dead = torch.diag(H) == 0   # masked fills, not boolean indexing (a host read of the indices)
    H.diagonal().masked_fill_(dead, 1)
    W.masked_fill_(dead.unsqueeze(0), 0)
    U, damp = inverse_hessian_factor(H, percdamp, name)  # H^-1 = U^T U, U: [in, in] upper
    del H
    if fused is None:
        fused = W.is_cuda and obs_kernel.usable(W)
    elif fused and not obs_kernel.usable(W):
        raise ValueError(f"{name}: the fused column loop needs float32 weights on CUDA with Triton "
                         f"(or TRITON_INTERPRET=1), got {W.dtype} on {W.device.type}")
    if fused:
        U = U.contiguous()   # no copy when rows are contiguous already: the kernel reads a row of U per column

    mask = torch.zeros_like(W, dtype=torch.bool)
    err_buffer = torch.empty(rows, min(block_size, cols), dtype=compute, device=W.device)
    for block_start in range(0, cols, block_size):
        block_end = min(block_start + block_size, cols)
        W_block = W[:, block_start:block_end]            # a view: the loop writes Q into W
        U_block = U[block_start:block_end, block_start:block_end]
        block_grid = grid.columns(block_start, block_end) if grid is not None else None
        if prune_n == 0 and sparsity > 0:
            mask_block = _block_mask(W_block, torch.diag(U_block), sparsity, row_splits)
        else:
            mask_block = torch.zeros_like(W_block, dtype=torch.bool)
        err_block = err_buffer[:, :block_end - block_start]
        if fused:
            obs_kernel.obs_block(W_block, U_block, err_block, mask_block, block_grid, prune_n, prune_m)
        else:
            _column_loop(W_block, U_block, err_block, mask_block, block_grid, prune_n, prune_m)
        mask[:, block_start:block_end] = mask_block
        W[:, block_end:].addmm_(err_block, U[block_start:block_end, block_end:], alpha=-1)
    return SolveResult(W.to(W_in_dtype), mask, damp)


def _column_loop(W_block: torch.Tensor, U_block: torch.Tensor, err_block: torch.Tensor, mask_block: torch.Tensor,
                 grid: Optional[QGrid], prune_n: int, prune_m: int) -> None:
    """The OBS updates inside one block, one column at a time (the CPU path and the fused kernel's reference).

    W_block: [rows, count] view, overwritten with Q; err_block: [rows, count] out; mask_block:
    [rows, count] bool, read (unstructured) or filled every M columns (N:M).
    """
    count = W_block.shape[1]
    W_work = W_block.clone()
    update = torch.empty_like(W_work)   # err U[j, :], rounded before it is subtracted (as the kernel does)
    d = torch.diag(U_block)
    if grid is not None:
        # With an integer zero point, scale * (clamp(round(w / scale) + zero, 0, maxq) - zero)
        # = scale * clamp(round(w / scale), -zero, maxq - zero): four kernels per column.
        scale, lo, hi = grid.scale, -grid.zero, grid.maxq - grid.zero
        passthrough = grid.maxq == 0          # 16-bit weights stay as they are
        any_passthrough = bool(passthrough.any())
    for j in range(count):
        if prune_n and j % prune_m == 0:
            # saliency_ij = w_ij^2 / U_jj^2 over the next M columns; prune the N lowest of each row.
            saliency = W_work[:, j:j + prune_m] ** 2 / d[j:j + prune_m].unsqueeze(0) ** 2
            lowest = torch.topk(saliency, prune_n, dim=1, largest=False).indices
            mask_block.scatter_(1, j + lowest, True)
        w = W_work[:, j]
        q = w.masked_fill(mask_block[:, j], 0)
        if grid is not None:
            quantized = torch.clamp(torch.round(q / scale[:, j]), lo[:, j], hi[:, j]).mul_(scale[:, j])
            q = torch.where(passthrough[:, j], q, quantized) if any_passthrough else quantized
        col_err = (w - q).div_(d[j])
        W_work[:, j:].sub_(torch.mul(col_err.unsqueeze(1), U_block[j, j:].unsqueeze(0), out=update[:, j:]))
        W_block[:, j] = q
        err_block[:, j] = col_err


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
