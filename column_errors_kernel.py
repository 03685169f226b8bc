"""``channel_grouping.column_errors`` on CUDA as one Triton launch (Triton's interpreter on the CPU, for tests).

The PyTorch path makes ~12 passes over [out, in] float32 tensors per width, plus a float64 copy
and a sum: ~30 ms for a 13824 x 5120 sub-layer on the H100, ~35 full passes per width. Here each
program reads a strip of columns of W once per width, gathers its rows' grids from the small
[widths, out, groups] tables, and sums the weighted squared errors over its rows in float64:

    q = s * rint(clamp(w / s, -z, maxq - z));   E[j, b] += h_j [kept] (w - q)^2

Every per-element value is the PyTorch path's, operation for operation (IEEE division, no fused
multiply-adds; clamp-then-round equals round-then-clamp for the integer bounds of a grid), so the
errors differ from it only by the order of the float64 sums over the rows. Partial sums per row
split go to a [splits, widths, in] table summed afterwards: no atomics, so a run is deterministic.
Triton is imported lazily: machines without it (CI) never import it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

import obs_kernel


def usable(W: torch.Tensor) -> bool:
    """Whether ``column_errors`` can run on W: on CUDA with Triton, or on the CPU under the interpreter."""
    return W.dtype == torch.float32 and obs_kernel.triton_available() and (W.is_cuda != obs_kernel.interpreting())


@functools.cache
def _kernel(interpret: bool):
    """Build the kernel once per mode (triton.jit reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def column_errors_kernel(
            W_ptr, stride_w,          # W [rows, cols] float32, rows contiguous
            K_ptr, stride_k,          # keep mask [rows, cols] uint8 (HAS_KEEP)
            H_ptr, L_ptr,             # h_diag [cols] float32, labels [cols] int32
            S_ptr, Z_ptr, MQ_ptr,     # scale, zero [widths, rows, groups] float32; maxq [widths] float32
            P_ptr,                    # partial sums [splits, widths, cols] float64, out
            rows, cols, groups, rows_per_split,
            WIDTHS: tl.constexpr, HAS_KEEP: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RINT: tl.constexpr):
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)        # [BLOCK_C] columns of this program
        split = tl.program_id(1)
        c_ok = c < cols
        lab = tl.load(L_ptr + c, mask=c_ok, other=0)
        h = tl.load(H_ptr + c, mask=c_ok, other=0.0)
        r_start = split * rows_per_split
        r_end = tl.minimum(r_start + rows_per_split, rows)
        for b in tl.static_range(WIDTHS):
            maxq = tl.load(MQ_ptr + b)
            acc = tl.zeros([BLOCK_C], dtype=tl.float64)
            r0 = 0
            while r0 < rows_per_split:   # a while loop: Triton's interpreter cannot range() over a runtime int
                r = r_start + r0 + tl.arange(0, BLOCK_R)
                ok = (r < r_end)[:, None] & c_ok[None, :]
                w = tl.load(W_ptr + r[:, None] * stride_w + c[None, :], mask=ok, other=0.0)
                g_off = b * rows * groups + r[:, None] * groups + lab[None, :]
                s = tl.load(S_ptr + g_off, mask=ok, other=1.0)
                z = tl.load(Z_ptr + g_off, mask=ok, other=0.0)
                y = tl.minimum(tl.maximum(tl.math.div_rn(w, s), -z), maxq - z)
                if RINT:
                    y = libdevice.rint(y)
                else:   # the interpreter has no libdevice; |y| <= 255: add and remove 1.5 * 2^23
                    y = (y + 12582912.0) - 12582912.0
                t = w - y * s
                t = t * t
                if HAS_KEEP:
                    kept = tl.load(K_ptr + r[:, None] * stride_k + c[None, :], mask=ok, other=0) != 0
                    t = t * tl.where(kept, h[None, :], 0.0)
                else:
                    t = t * h[None, :]
                acc += tl.sum(tl.where(ok, t, 0.0).to(tl.float64), axis=0)
                r0 += BLOCK_R
            tl.store(P_ptr + (split * WIDTHS + b) * cols + c, acc, mask=c_ok)

    return column_errors_kernel


def column_error_sums(W: torch.Tensor, h_diag: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor, maxq: torch.Tensor, keep_mask: Optional[torch.Tensor] = None,
                      splits: Optional[int] = None) -> torch.Tensor:
    """Per-column weighted squared quantisation errors at each width, one launch.

    W: [out, in] float32; h_diag: [in] float32; labels: [in] int; scale, zero: [widths, out, groups]
    float32 (each width's ``quant.group_scales``); maxq: [widths] float32 (> 0); keep_mask: [out, in]
    bool or None. Returns [in, widths] float64.
    """
    rows, cols = W.shape
    widths, groups = scale.shape[0], scale.shape[2]
    assert W.dtype == h_diag.dtype == scale.dtype == zero.dtype == maxq.dtype == torch.float32
    assert scale.shape == zero.shape == (widths, rows, groups) and maxq.shape == (widths,)
    W = W if W.stride(1) == 1 else W.contiguous()
    keep = keep_mask.contiguous().view(torch.uint8) if keep_mask is not None else W
    block_c, block_r = 32, 32
    col_tiles = -(-cols // block_c)
    if splits is None:   # enough programs for every SM (132 on an H100) a few times over
        splits = max(1, min(-(-rows // (4 * block_r)), -(-1024 // col_tiles)))
    rows_per_split = -(-rows // splits)
    partial = torch.zeros(splits, widths, cols, dtype=torch.float64, device=W.device)
    _kernel(obs_kernel.interpreting())[(col_tiles, splits)](
        W, W.stride(0), keep, keep.stride(0) if keep_mask is not None else 0,
        h_diag.contiguous(), labels.to(torch.int32).contiguous(),
        scale.contiguous(), zero.contiguous(), maxq.contiguous(), partial,
        rows, cols, groups, rows_per_split,
        WIDTHS=widths, HAS_KEEP=keep_mask is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        RINT=not obs_kernel.interpreting(), num_warps=4,
        enable_fp_fusion=False)   # every product and difference rounded on its own, as in PyTorch
    return partial.sum(0).T
