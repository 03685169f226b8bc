"""Bit allocation on the real SmolLM2 weights and activations: every sub-layer meets the target."""
import pytest
import torch

import sparsegpt
import vicuna_mi
from channel_grouping import column_errors, spectral_cluster
from mi_estimator import covariance_from_sums, gaussian_mi
from sparsegpt import InputStats
from walker import LayerWalker


@pytest.fixture(scope="module")
def layer_stats(smollm2, data_dir):
    """(weights, Hessian, MI labels) of every sub-layer of SmolLM2's first three decoder layers."""
    import datautils
    ids = datautils.calibration_windows("c4", smollm2.tokenizer, 2, 64, 0, data_dir)
    walker = LayerWalker(smollm2.model, "cpu")
    acts = walker.capture(ids)
    out = []
    for i, layer in walker.layers():
        if i == 3:
            break
        for group in vicuna_mi.sublayer_groups(layer):
            stats = InputStats(group[0][1].in_features, "cpu")
            walker.feed(layer, acts, group[0][1], stats.add)
            labels = spectral_cluster(gaussian_mi(covariance_from_sums(stats.sum_xxT, stats.sum_x, stats.num_samples)),
                                      8, seed=i).labels
            out += [(name, m.weight.data.clone(), stats.hessian(), labels) for name, m in group]
        acts = walker.run(layer, acts)
    return out


@pytest.mark.parametrize("target", [3.0, 3.5, 4.0, 5.0])
def test_every_sublayer_meets_the_target(layer_stats, target):
    cfg = vicuna_mi.CompressConfig("smollm2-135m", "c4", target_avg_bits=target, n_groups=8)
    total_bits = total_weights = 0.0
    for name, W, H, labels in layer_stats:
        grid, [(col_bits, new_labels, info)] = vicuna_mi.plan_quantization(cfg, W.float(), [W.shape[0]], H, labels)
        assert abs(col_bits.double().mean().item() - target) <= 0.01, name
        assert set(col_bits.tolist()) <= set(cfg.bit_choices)
        # each final label has one width, and the grid carries it
        for g in torch.unique(new_labels):
            assert torch.unique(col_bits[new_labels == g]).numel() == 1
        assert torch.equal(grid.maxq[0], (2 ** col_bits.float()) - 1)
        assert info["group_sizes"] == torch.bincount(new_labels).tolist()
        total_bits += col_bits.double().sum().item() * W.shape[0]
        total_weights += W.numel()
    assert abs(total_bits / total_weights - target) <= 0.01


@pytest.mark.parametrize("target", [3, 4])
def test_allocation_beats_one_width_for_all(layer_stats, target):
    """At a target that is itself a width, giving every channel that width is one candidate."""
    cfg = vicuna_mi.CompressConfig("smollm2-135m", "c4", target_avg_bits=float(target), n_groups=8)
    bits = list(cfg.bit_choices)
    gains = []
    for name, W, H, labels in layer_stats:
        _, [(col_bits, _, info)] = vicuna_mi.plan_quantization(cfg, W.float(), [W.shape[0]], H, labels)
        keep = ~sparsegpt.prune_mask(sparsegpt.wanda_scores(W, H), cfg.sparsity, 0, 0, per_row=True)
        col_err = column_errors(W.float(), torch.diag(H).float(), labels, cfg.n_groups, bits, keep)
        chosen = torch.tensor([bits.index(int(b)) for b in col_bits])
        assert info["est_error"] == pytest.approx(float(col_err[torch.arange(W.shape[1]), chosen].sum()), rel=1e-9)
        uniform = float(col_err[:, bits.index(target)].sum())
        assert info["est_error"] <= uniform * (1 + 1e-9), name
        gains.append(info["est_error"] / uniform)
    assert sum(gains) / len(gains) < 0.9  # mixed widths are clearly better on average


@pytest.mark.parametrize("sparsity", [0.5, 0.0])
def test_stacked_plan_is_bitwise_each_sublayers_own_plan(layer_stats, sparsity):
    """q/k/v planned as one stack (one set of launches) get exactly the grids, widths and labels they get alone."""
    cfg = vicuna_mi.CompressConfig("smollm2-135m", "c4", target_avg_bits=3.5, n_groups=8, sparsity=sparsity)
    qkv = [entry for entry in layer_stats if entry[0].startswith("self_attn.") and entry[0] != "self_attn.o_proj"][:3]
    assert [name for name, *_ in qkv] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    H, labels = qkv[0][2], qkv[0][3]
    assert all(torch.equal(h, H) and torch.equal(lab, labels) for _, _, h, lab in qkv)
    splits = [W.shape[0] for _, W, _, _ in qkv]
    grid, plans = vicuna_mi.plan_quantization(cfg, torch.cat([W for _, W, _, _ in qkv]).float(), splits, H, labels)
    r0 = 0
    for (name, W, _, _), (col_bits, new_labels, info) in zip(qkv, plans):
        alone_grid, [(alone_bits, alone_labels, alone_info)] = vicuna_mi.plan_quantization(cfg, W.float(), [W.shape[0]], H, labels)
        assert torch.equal(col_bits, alone_bits) and torch.equal(new_labels, alone_labels) and info == alone_info, name
        for part in ("scale", "zero", "maxq"):
            assert torch.equal(getattr(grid, part)[r0:r0 + W.shape[0]], getattr(alone_grid, part)), (name, part)
        r0 += W.shape[0]
