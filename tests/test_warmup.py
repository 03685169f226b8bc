"""The warm-up child (warmup.py): what the parent hands it, what it runs, and, on CUDA, that a fresh
process then finds its kernels in the on-disk caches (Triton's, and the driver's for cuDNN attention)."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import obs_kernel
import warmup

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def tiny(head_dim=None, dtype=torch.float32):
    config = LlamaConfig(vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=head_dim)
    return LlamaForCausalLM(config).to(dtype)


def echo_child() -> warmup.Warmup:
    """A Warmup whose process only echoes what it reads on stdin."""
    code = "import sys; sys.stdout.write(sys.stdin.read())"
    return warmup.Warmup(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE))


@pytest.mark.parametrize("head_dim, dtype, expected", [(None, torch.float32, "16 96 float32\n"),   # hidden / heads
                                                       (64, torch.bfloat16, "64 96 bfloat16\n")])
def test_attention_hands_the_child_head_size_window_and_dtype(head_dim, dtype, expected):
    child = echo_child()
    child.attention(tiny(head_dim, dtype), 96)
    child.attention(tiny(head_dim, dtype), 96)   # once only: the second is not sent
    assert child.process.stdout.read().decode() == expected
    child.close()
    assert child.process.returncode == 0


def test_close_ends_a_child_still_waiting():
    child = warmup.Warmup(subprocess.Popen([sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(60)"],
                                           stdin=subprocess.PIPE))
    child.close()
    assert child.process.returncode is not None


def test_main_rehearses_the_named_attention(monkeypatch):
    seen = []
    monkeypatch.setattr(warmup, "rehearse_attention", lambda *args: seen.append(args))
    monkeypatch.setattr(sys, "stdin", io.StringIO("128 2048 float16\n"))
    assert warmup.main(["--device", "cpu"]) == 0
    assert seen == [(128, 2048, torch.float16, "cpu")]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))   # the parent ended without naming one
    assert warmup.main(["--device", "cpu"]) == 0
    assert len(seen) == 1


def test_rehearsal_runs_a_causal_attention_of_the_named_kind():
    out = warmup.rehearse_attention(16, 8, torch.bfloat16, "cpu")
    assert out.shape == (1, 1, 8, 16) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.zeros_like(out))


def test_start_is_cuda_only():
    assert warmup.start(torch.device("cpu"), (True, 0, 0, 128)) is None


def cache_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.skipif(not (CUDA and obs_kernel.triton_available()), reason="needs CUDA and Triton")
def test_fresh_process_finds_the_childs_triton_forms(tmp_path, monkeypatch):
    """After the child's precompile, a fresh process's solves compile nothing: no new Triton cache entry
    (shapes that are multiples of 16, as a LLaMA-family model's)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))   # the child inherits it
    child = warmup.start(torch.device("cuda"), (True, 0, 0, 128))
    child.process.stdin.close()   # no attention to rehearse
    assert child.process.wait(timeout=300) == 0
    entries = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert entries
    solve = ("import torch, tests.test_obs_kernel as t\n"
             "for rows, d in ((320, 208), (96, 592), (48, 128)):\n"
             "    W, H, grid = t.problem(rows=rows, d=d, seed=rows)\n"
             "    t.solve_both(W, H, grid, device='cuda', quantize=True, sparsity=0.5)\n")
    run = subprocess.run([sys.executable, "-c", solve], cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == entries


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fresh_process_finds_the_childs_attention_kernel(tmp_path, monkeypatch):
    """The child's rehearsal fills the driver's cache; a fresh process's attention of the model's kind
    (other batch, heads, grouped KV and window length) adds nothing to it."""
    monkeypatch.setenv("CUDA_CACHE_PATH", str(tmp_path))   # an empty driver cache, inherited by the children
    child = warmup.start(torch.device("cuda"), None)
    child.attention(tiny(64, torch.float16), 2048)
    assert child.process.wait(timeout=300) == 0
    filled = cache_files(tmp_path)
    assert filled
    attend = ("import torch, torch.nn.functional as F\n"
              "q = torch.randn(4, 9, 1024, 64, device='cuda', dtype=torch.float16)\n"
              "k = torch.randn(4, 3, 1024, 64, device='cuda', dtype=torch.float16)\n"
              "F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)\n"
              "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", attend], cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert cache_files(tmp_path) == filled


@pytest.mark.skipif(not obs_kernel.triton_available(), reason="needs Triton")
def test_prime_triton_key_computes_the_cached_key():
    from triton.runtime.cache import triton_key
    triton_key.cache_clear()
    thread = warmup.prime_triton_key()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert triton_key.cache_info().currsize == 1   # the next call (the first launch's) is a cache hit
    key = triton_key()
    assert triton_key.cache_info().hits >= 1 and key


def test_attention_names_nothing_for_a_model_without_heads():
    child = echo_child()
    from transformers import PretrainedConfig
    model = torch.nn.Linear(4, 4)
    model.config = PretrainedConfig()   # no hidden size, no heads
    child.attention(model, 96)
    assert child.process.stdout.read().decode() == ""
    child.close()
