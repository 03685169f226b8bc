"""Quantization grids: levels per row, rounding error bound, exact zero, arbitrary column groups."""
import pytest
import torch

from quant import fp16_ceil, group_grid, quantize_weight, uniform_grid


def rand_w(rows=16, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_uniform_levels_and_error_bound(bits, sym):
    W = rand_w()
    grid = uniform_grid(W, bits, sym)
    Q = quantize_weight(W, grid)
    for r in range(W.shape[0]):
        assert torch.unique(Q[r]).numel() <= 2 ** bits
    # inside the grid's range the rounding error is at most half a step; the asymmetric grid's
    # range misses the row's range by at most half a step (integer zero point), so it bounds all
    inside = (W >= grid.scale * (0 - grid.zero)) & (W <= grid.scale * (grid.maxq - grid.zero))
    err = (W - Q).abs()
    assert inside.float().mean() > 0.8
    assert (err[inside] <= grid.scale[inside] / 2 + 1e-6).all()
    if not sym:
        assert (err <= grid.scale / 2 + 1e-6).all()


def test_zero_is_exact_and_sixteen_bits_pass_through():
    W = rand_w()
    W[:, ::3] = 0
    for bits in (2, 3, 4):
        Q = quantize_weight(W, uniform_grid(W, bits))
        assert (Q[:, ::3] == 0).all()
    assert torch.equal(quantize_weight(W, uniform_grid(W, 16)), W)


def test_arbitrary_column_groups_get_their_own_grid_and_width():
    W = rand_w(8, 30, seed=1)
    labels = torch.tensor([i % 3 for i in range(30)])  # interleaved, not contiguous
    bits = [2, 4, 16]
    grid = group_grid(W, labels, bits)
    Q = quantize_weight(W, grid)
    for g, b in enumerate(bits):
        cols = labels == g
        if b == 16:
            assert torch.equal(Q[:, cols], W[:, cols])
            continue
        assert (grid.maxq[:, cols] == 2 ** b - 1).all()
        for r in range(W.shape[0]):
            # one grid per (row, group): the group's values are integers on it
            s, z = grid.scale[r, cols], grid.zero[r, cols]
            assert torch.unique(s).numel() == 1 and torch.unique(z).numel() == 1
            levels = Q[r, cols] / s + z
            torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
            assert torch.unique(Q[r, cols]).numel() <= 2 ** b
            # the group's own range sets the grid: step = (max(w, 0) - min(w, 0)) / (2^b - 1),
            # rounded up to the next float16 value (at most one fp16 step, 2^-10 relative, above)
            span = W[r, cols].max().clamp(min=0) - W[r, cols].min().clamp(max=0)
            step = span / (2 ** b - 1)
            assert step <= s[0] <= step * (1 + 2 ** -10)


def test_contiguous_blocks():
    W = rand_w(4, 64)
    grid = group_grid(W, torch.arange(64) // 16, [4] * 4)
    assert torch.unique(grid.scale[0]).numel() == 4


def test_bad_width_and_nan_raise():
    with pytest.raises(ValueError, match="bit width 9"):
        uniform_grid(rand_w(), 9)
    W = rand_w()
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        uniform_grid(W, 4)


@pytest.mark.parametrize("sym", [False, True])
def test_scales_are_float16_values_and_zero_points_fit(sym):
    W = rand_w(32, 48, seed=2) * torch.logspace(-9, 4, 32).unsqueeze(1)   # tiny to huge rows
    labels = torch.arange(48) % 4
    bits = [2, 3, 8, 16]
    grid = group_grid(W, labels, bits, sym)
    quantized = grid.maxq > 0
    s = grid.scale[quantized]
    assert (s > 0).all() and torch.equal(s.half().float(), s)      # lossless as fp16
    assert (grid.zero >= 0).all() and (grid.zero <= grid.maxq.clamp(min=1)).all()
    assert torch.equal(grid.zero, grid.zero.round())


def test_fp16_ceil_rounds_up_to_the_next_float16():
    x = torch.tensor([1.0, 1.0 + 2 ** -12, 0.1, 1e-9, 7e4])
    up = fp16_ceil(x)
    assert torch.equal(up.half().float(), up)
    assert up[0] == 1.0 and up[1] == 1.0 + 2 ** -10 and up[2] >= 0.1 and up[3] == 2 ** -24
    assert up[4] == 65504.0   # capped at the float16 maximum


@pytest.mark.parametrize("sym", [False, True])
def test_stacked_group_grid_rows_are_each_sublayers_own_grid(sym):
    """Stacked sub-layers with their own labels and widths: each row block is bitwise its own group_grid."""
    from quant import stacked_group_grid
    W = rand_w(30, 24, seed=5)
    g = torch.Generator().manual_seed(5)
    labels = [torch.randint(0, 3, (24,), generator=g), torch.randint(0, 4, (24,), generator=g), torch.zeros(24, dtype=torch.long)]
    bits = [[2, 4, 16], [3, 3, 8, 2], [4]]
    grid = stacked_group_grid(W, [12, 10, 8], labels, bits, sym)
    r0 = 0
    for rows, lab, b in zip([12, 10, 8], labels, bits):
        alone = group_grid(W[r0:r0 + rows], lab, b, sym)
        for part in ("scale", "zero", "maxq"):
            assert torch.equal(getattr(grid, part)[r0:r0 + rows], getattr(alone, part)), part
        r0 += rows
    W[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stacked_group_grid(W, [12, 10, 8], labels, bits, sym)
