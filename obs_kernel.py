"""The SparseGPT column loop of one block, fused into one Triton launch (CUDA; Triton's interpreter on the CPU).

``sparsegpt.sparsegpt_solve`` keeps its PyTorch loop as the CPU path and the reference; on CUDA it
calls ``obs_block`` once per block of columns instead of ~10 kernels per column. Once a block's mask
is chosen, the OBS updates of different rows are independent, so each program takes a tile of rows
and runs the whole block in registers. Per column j of the block (Section 3 of the paper):

    w = W[:, j];   q = 0 if pruned, else scale * clamp(round(w / scale), -zero, maxq - zero)  (w where maxq == 0)
    err = (w - q) / U_jj;   W[:, j:] -= err U[j, j:]   (U upper triangular: earlier columns stay)

N:M masks are chosen inside the kernel every M columns from the updated weights (the N lowest
saliencies w^2 / U_jj^2 of each row); unstructured masks come in, chosen by the caller before the
block. Triton is imported lazily: machines without it (CI) never import it.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from quant import QGrid


def triton_available() -> bool:
    """True when Triton is installed (found without importing it; it may still lack a GPU backend)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run in NumPy on CPU tensors. Triton reads the variable
    when it is first imported, so it must be set before anything imports triton."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def usable(W: torch.Tensor) -> bool:
    """Whether ``obs_block`` can run on W: float32 on CUDA with Triton, or on the CPU under the interpreter."""
    return W.dtype == torch.float32 and triton_available() and (W.is_cuda != interpreting())


@functools.cache
def _kernel(interpret: bool):
    """Build the kernel once per mode (triton.jit reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    # Triton specialises the integer arguments on divisibility by 16 (and pointers on 16-byte
    # alignment): it lets the tile loads and stores vectorise. Not specialising rows, counts and row
    # strides was tried and dropped: prune + quantize on the H100 took 23.7 s instead of 14.3 s for
    # Vicuna-13B and 11.2 s instead of 7.9 s for LLaMA-7B.
    @triton.jit
    def obs_block_kernel(
            W_ptr, stride_w_row, stride_w_col,   # W block [rows, count], float32: read, then overwritten with Q
            E_ptr, stride_e_row,                 # errors [rows, count], float32, out
            U_ptr, stride_u_row, stride_u_col,   # U block [count, count], float32, upper triangular
            M_ptr, stride_m_row,                 # mask [rows, count], uint8: in (unstructured) or out (N:M)
            S_ptr, Z_ptr, Q_ptr, stride_g_row, stride_g_col,   # grid scale, zero, maxq [rows, count]
            rows, count,                         # runtime: a ragged last block shares the compiled kernel
            HAS_GRID: tl.constexpr, PRUNE_N: tl.constexpr, STEP: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RINT: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)     # [BLOCK_R] rows of this program
        c = tl.arange(0, BLOCK_C)                                  # [BLOCK_C] columns of the block
        r_ok = r < rows
        c_ok = c < count
        tile_ok = r_ok[:, None] & c_ok[None, :]
        W = tl.load(W_ptr + r[:, None] * stride_w_row + c[None, :] * stride_w_col, mask=tile_ok, other=0.0)
        d = tl.load(U_ptr + c * (stride_u_row + stride_u_col), mask=c_ok, other=1.0)   # U_jj
        E = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        pruned_tile = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int1)
        g = 0
        while g < count:   # a while loop: the interpreter cannot range() over a runtime bound
            if PRUNE_N > 0:
                # saliency_ij = w_ij^2 / U_jj^2 over columns g..g+M-1; rank within the group, ties
                # to the lower column; the N lowest of each row are pruned.
                sal = tl.math.div_rn(W * W, (d * d)[None, :])
                rank = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
                for k in tl.static_range(STEP):
                    s_k = tl.sum(tl.where(c[None, :] == g + k, sal, 0.0), axis=1)[:, None]   # [BLOCK_R, 1]
                    lower = (s_k < sal) | ((s_k == sal) & (g + k < c[None, :]))
                    rank += lower.to(tl.int32)
                in_group = (c >= g) & (c < g + STEP)
                pruned_tile = tl.where(in_group[None, :], rank < PRUNE_N, pruned_tile)
            for k in tl.static_range(STEP):
                j = g + k
                this_col = c[None, :] == j                                          # [1, BLOCK_C]
                w = tl.sum(tl.where(this_col, W, 0.0), axis=1)                      # [BLOCK_R]
                if PRUNE_N > 0:
                    pruned = tl.sum(tl.where(this_col & pruned_tile, 1, 0), axis=1) > 0
                else:
                    pruned = tl.load(M_ptr + r * stride_m_row + j, mask=r_ok, other=0) != 0
                q = tl.where(pruned, 0.0, w)
                if HAS_GRID:
                    g_off = r * stride_g_row + j * stride_g_col
                    scale = tl.load(S_ptr + g_off, mask=r_ok, other=1.0)
                    zero = tl.load(Z_ptr + g_off, mask=r_ok, other=0.0)
                    maxq = tl.load(Q_ptr + g_off, mask=r_ok, other=0.0)
                    # clamp(round(x), lo, hi) = round(clamp(x, lo, hi)) for integer lo, hi. Rounding half
                    # to even like torch.round: rint on the GPU; in the interpreter (no libdevice), as
                    # |x| <= 255 after the clamp, adding and removing 1.5 * 2^23.
                    x = tl.minimum(tl.maximum(tl.math.div_rn(q, scale), -zero), maxq - zero)
                    if RINT:
                        x = libdevice.rint(x)
                    else:
                        x = (x + 12582912.0) - 12582912.0   # 1.5 * 2^23
                    q = tl.where(maxq == 0.0, q, x * scale)    # maxq == 0: 16-bit weight, passed through
                d_j = tl.load(U_ptr + j * (stride_u_row + stride_u_col))
                err = tl.math.div_rn(w - q, d_j)                                     # [BLOCK_R]
                u = tl.load(U_ptr + j * stride_u_row + c * stride_u_col, mask=c_ok & (c >= j), other=0.0)   # U[j, :]
                W = W - err[:, None] * u[None, :]
                W = tl.where(this_col, q[:, None], W)   # column j is final: it holds Q from here on
                E = tl.where(this_col, err[:, None], E)
            g += STEP
        tl.store(W_ptr + r[:, None] * stride_w_row + c[None, :] * stride_w_col, W, mask=tile_ok)
        tl.store(E_ptr + r[:, None] * stride_e_row + c[None, :], E, mask=tile_ok)
        if PRUNE_N > 0:
            tl.store(M_ptr + r[:, None] * stride_m_row + c[None, :], pruned_tile.to(tl.uint8), mask=tile_ok)

    return obs_block_kernel


def _tile_shape(block_c: int) -> tuple[int, int]:
    """(rows per program, warps): small tiles keep the block in registers and give every SM programs."""
    if block_c <= 32:
        return 64, 4
    if block_c <= 64:
        return 32, 4
    return 16, 4


def obs_block(W_block: torch.Tensor, U_block: torch.Tensor, err: torch.Tensor, mask: torch.Tensor,
              grid: Optional[QGrid], prune_n: int = 0, prune_m: int = 0,
              rows_per_program: Optional[int] = None, num_warps: Optional[int] = None) -> None:
    """Prune/quantize one block of columns in place, one launch.

    W_block: [rows, count] float32 (a column slice of W; rows may be strided), overwritten with Q.
    U_block: [count, count] float32, the block's part of the upper Cholesky factor of H^-1 (rows
    contiguous reads fastest).
    err: [rows, count] float32 contiguous rows, out: (w - q) / U_jj of every column.
    mask: [rows, count] bool, True where pruned: read when prune_n == 0, written for N:M.
    grid: the block's columns of the grid, or None (pruning only).
    """
    rows, count = W_block.shape
    assert W_block.dtype == U_block.dtype == err.dtype == torch.float32, (W_block.dtype, U_block.dtype, err.dtype)
    assert U_block.shape == (count, count) and err.shape == (rows, count) and mask.shape == (rows, count)
    assert err.stride(1) == 1 and mask.stride(1) == 1 and mask.dtype == torch.bool, \
        (err.stride(), mask.stride(), mask.dtype)
    if prune_n and count % prune_m:
        raise ValueError(f"N:M: block of {count} columns is not a multiple of M={prune_m}")
    block_c = max(16, 1 << (count - 1).bit_length())
    default_rows, default_warps = _tile_shape(block_c)
    block_r = rows_per_program or default_rows
    if grid is not None:
        scale, zero, maxq = grid.scale, grid.zero, grid.maxq
        if not (scale.stride() == zero.stride() == maxq.stride()):
            scale, zero, maxq = scale.contiguous(), zero.contiguous(), maxq.contiguous()
        assert scale.dtype == zero.dtype == maxq.dtype == torch.float32
        g_strides = scale.stride()
    else:
        scale = zero = maxq = W_block   # never read
        g_strides = (0, 0)
    kernel = _kernel(interpreting())
    kernel[(-(-rows // block_r),)](
        W_block, W_block.stride(0), W_block.stride(1),
        err, err.stride(0),
        U_block, U_block.stride(0), U_block.stride(1),
        mask.view(torch.uint8), mask.stride(0),
        scale, zero, maxq, g_strides[0], g_strides[1],
        rows, count,
        HAS_GRID=grid is not None, PRUNE_N=prune_n, STEP=prune_m if prune_n else 1,
        BLOCK_R=block_r, BLOCK_C=block_c, RINT=not interpreting(), num_warps=num_warps or default_warps,
        enable_fp_fusion=False)   # every product and sum rounded on its own, as in the PyTorch loop


def tile_widths(block_size: int) -> list[int]:
    """The BLOCK_C of every block a solve with ``block_size`` can launch: full and ragged last blocks."""
    return sorted({max(16, 1 << (count - 1).bit_length()) for count in range(1, block_size + 1)})


def precompile(has_grid: bool, prune_n: int, prune_m: int, block_size: int, device: torch.device | str) -> int:
    """Compile (into Triton's on-disk cache) every form of the kernel a solve with these settings launches
    on a model whose dimensions are multiples of 16 (every LLaMA-family model we know).

    A form is fixed by the constexprs (tile width, grid, N:M) and by which integer arguments are
    multiples of 16 and which pointers are 16-byte aligned. One launch per tile width
    (``tile_widths``) on dummy tensors laid out as ``sparsegpt_solve``'s (unit column strides, fresh
    aligned storage, every other size a multiple of 16), with a column count the solve can meet at
    that width (N:M: a multiple of M). Other shapes compile their own forms in their first solve, as
    without this. Returns the number of forms launched.
    """
    launched = 0
    for width in tile_widths(block_size):
        lo, hi = (1 if width == 16 else width // 2 + 1), min(width, block_size)   # counts that launch this width
        count = hi // prune_m * prune_m if prune_n else hi   # = width (a multiple of 16) unless the block is narrower
        if count < lo:
            continue   # N:M: no multiple of M falls in this width
        W = torch.zeros(16, count, device=device)
        grid = QGrid(torch.ones_like(W), torch.zeros_like(W), torch.full_like(W, 15.0)) if has_grid else None
        obs_block(W, torch.eye(count, device=device), torch.empty_like(W), torch.zeros_like(W, dtype=torch.bool),
                  grid, prune_n, prune_m)
        launched += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return launched
