"""The fast paths of the compression (issue 9) agree with the plain ones.

- The fused OBS column loop (obs_kernel, Triton) against the PyTorch loop: the same mask and the same
  weights, unstructured and N:M, with mixed widths, 16-bit columns, fused sub-layers and a short last
  block. On the CPU it runs under Triton's interpreter; without Triton these tests are skipped. On a
  CUDA machine the compiled kernel is checked too.
- Shared statistics/propagate passes of LLaMA-style layers against the walker's generic passes.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import obs_kernel
import vicuna_mi
from quant import QGrid, group_grid
from sparsegpt import sparsegpt_solve
from tests.test_sparsegpt import layer

REPO = Path(__file__).resolve().parents[1]


def problem(rows=40, d=72, seed=0):
    """W [rows, d], H and a grid with mixed widths and one 16-bit (pass-through) group."""
    W, _, H = layer(rows=rows, d=d, seed=seed)
    labels = torch.arange(d) % 4
    return W, H, group_grid(W, labels, [2, 3, 4, 16])


CASES = {   # name: solve keywords (block 32 over 72 columns: the last block has 8)
    "unstructured": dict(sparsity=0.5),
    "unstructured+grid": dict(sparsity=0.5, quantize=True),
    "2:4+grid": dict(prune_n=2, prune_m=4, quantize=True),
    "1:8": dict(prune_n=1, prune_m=8),
    "gptq": dict(sparsity=0.0, quantize=True),
}


def solve_both(W, H, grid, device="cpu", quantize=False, **kw):
    """(plain, fused) solves of W on ``device``; ``quantize`` puts them on ``grid``. The rows are
    split 3:2 into two fused sub-layers."""
    if quantize:
        kw["grid"] = QGrid(*(t.to(device) for t in (grid.scale, grid.zero, grid.maxq)))
    W, H = W.to(device), H.to(device)
    first = W.shape[0] * 3 // 5
    args = dict(block_size=32, row_splits=[first, W.shape[0] - first], **kw)
    return sparsegpt_solve(W, H, fused=False, **args), sparsegpt_solve(W, H, fused=True, **args)


def interpreter_results() -> dict:
    """Every case through both loops, the kernel in Triton's interpreter: {case: (same mask, max |dW|, N:M ok)}.

    Run in a fresh process by the fixture below: Triton picks its interpreter when first imported,
    and in this process torch has imported it already.
    """
    results = {}
    for case, kw in CASES.items():
        W, H, grid = problem()
        plain, fused = solve_both(W, H, grid, **kw)
        nm_ok = True
        if "prune_n" in kw:
            nm_ok = bool((fused.mask.reshape(40, -1, kw["prune_m"]).sum(-1) == kw["prune_n"]).all())
        results[case] = (bool(torch.equal(plain.mask, fused.mask)), (fused.weight - plain.weight).abs().max().item(), nm_ok)
    W, H, grid = problem(rows=20, d=48, seed=3)   # a dead column, one block wider than 32
    H[:, 7] = 0
    H[7, :] = 0
    args = dict(sparsity=0.5, grid=grid, block_size=48, row_splits=[20])
    plain, fused = sparsegpt_solve(W, H, fused=False, **args), sparsegpt_solve(W, H, fused=True, **args)
    results["dead column"] = (bool(torch.equal(plain.mask, fused.mask)), (fused.weight - plain.weight).abs().max().item(),
                              bool((fused.weight[:, 7] == 0).all()))
    results["precompile"] = precompile_coverage()
    return results


def precompile_coverage() -> dict:
    """Tile widths ``obs_kernel.precompile`` launches vs those real solves launch (block 32), per pattern."""
    seen: list[int] = []
    tile_shape = obs_kernel._tile_shape
    obs_kernel._tile_shape = lambda block_c: (seen.append(block_c), tile_shape(block_c))[1]
    coverage = {}
    for name, (n, m, widths) in {"unstructured": (0, 0, (72, 48, 80, 90, 32, 7)), "2:4": (2, 4, (72, 44, 36)),
                                 "16:32": (16, 32, (96, 64))}.items():
        seen.clear()
        forms = obs_kernel.precompile(True, n, m, 32, "cpu")
        compiled = sorted(set(seen))
        seen.clear()
        for d in widths:
            W, H, grid = problem(rows=6, d=d, seed=d)
            sparsegpt_solve(W, H, sparsity=0.0 if n else 0.5, prune_n=n, prune_m=m, grid=grid, block_size=32, fused=True)
        coverage[name] = (forms, compiled, sorted(set(seen)))
    obs_kernel._tile_shape = tile_shape
    return coverage


@pytest.fixture(scope="module")
def interpreted():
    if not obs_kernel.triton_available():
        pytest.skip("Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    code = "import json, tests.test_obs_kernel as t; print(json.dumps(t.interpreter_results()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_precompile_launches_every_tile_width_a_solve_launches(interpreted):
    """The warm-up child (``warmup.start``) compiles every kernel form the solves use (the
    kernel is specialised on its constexprs only: tile width, grid, N:M)."""
    cov = interpreted["precompile"]
    assert cov["unstructured"][1] == [16, 32] and cov["unstructured"][0] == 2   # block 32: full and short blocks
    assert cov["2:4"][1] == [16, 32]
    assert cov["16:32"][1] == [32]   # a block of 16 columns cannot hold a group of 32
    for forms, compiled, used in cov.values():
        assert set(used) <= set(compiled), (used, compiled)


@pytest.mark.parametrize("case", [*CASES, "dead column"])
def test_fused_loop_equals_plain_loop_in_the_interpreter(case, interpreted):
    same_mask, max_diff, pattern_ok = interpreted[case]
    assert same_mask and pattern_ok
    assert max_diff <= 1e-6


def test_fused_loop_refuses_what_it_cannot_run():
    W, H, _ = problem(rows=8, d=16)
    assert not obs_kernel.usable(W.double())
    with pytest.raises(ValueError, match="fused column loop"):
        sparsegpt_solve(W.double(), H, sparsity=0.5, fused=True)
    if not W.is_cuda and not obs_kernel.interpreting():
        assert not obs_kernel.usable(W)
        with pytest.raises(ValueError, match="fused column loop"):
            sparsegpt_solve(W, H, sparsity=0.5, fused=True)


@pytest.mark.skipif(not (torch.cuda.is_available() and obs_kernel.triton_available()), reason="needs CUDA and Triton")
@pytest.mark.parametrize("case", CASES)
def test_compiled_kernel_equals_plain_loop_on_cuda(case):
    W, H, grid = problem(rows=300, d=200, seed=1)
    plain, fused = solve_both(W, H, grid, device="cuda", **CASES[case])
    assert torch.equal(plain.mask, fused.mask)
    assert ((fused.weight - plain.weight).norm() / plain.weight.norm()).item() < 1e-5


TINY = dict(vocab_size=128, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_passes_equal_the_walkers_passes(family):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY)).eval()
    layer0 = model.model.layers[0]
    assert vicuna_mi._SharedPasses.applies(layer0, vicuna_mi.sublayer_groups(layer0))
    cfg = vicuna_mi.CompressConfig("tiny", "c4", nsamples=5, seqlen=16, n_groups=2, batch_size=2, device="cpu")
    calib = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))   # 5 windows: a short last batch
    cpu = torch.device("cpu")
    models, records = {}, {}
    for shared in (True, False):
        models[shared] = copy.deepcopy(model)
        records[shared] = vicuna_mi.compress_model(cfg, models[shared], calib, cpu, vicuna_mi.StageTimer(cpu),
                                                   shared_passes=shared)
    for (name, a), b in zip(models[True].named_parameters(), models[False].parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(records[True], records[False]):
        assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}
