"""One-time GPU costs of a run, paid by a child process while the parent loads the model.

Two costs fall on the first layer of a machine's first run and are kept in on-disk caches after it:
- Triton compiles the fused column loop's kernel forms (``obs_kernel.precompile``): ~2 s on the
  H100 with SmolLM2; Triton's cache is ``~/.triton``.
- cuDNN, torch's attention backend for half precision on the H100, generates its attention kernel
  at run time, and the driver compiles it from PTX: 0.7-1.0 s per head size and dtype, kept in the
  driver's cache (``~/.nv/ComputeCache``). A process that finds it there pays ~0.1 s.
  (H100, SmolLM2 at 128 x 2048: the first process's first attention pass took 1.11 s, a second
  process's 0.10 s; with the driver's cache off every process took ~0.9 s.)

``start`` launches the child before the load; the child compiles the Triton forms, then waits for
``Warmup.attention`` to send the loaded model's head size, window length and dtype, and runs one
causal attention of that kind. Its own interpreter: no GIL is shared with the loader. Its output
is discarded; it changes nothing but the caches. The kernels do not depend on the batch, the number
of heads or the window length (the driver's cache served other values of each), so one small
attention serves the model's.

A third cost falls on every process's first Triton launch, not only a machine's first: Triton keys
its cache with a hash of its own files. ``prime_triton_key`` computes it on a thread of the parent
while the model loads.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import obs_kernel


class Warmup:
    """The child process of ``start``."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def attention(self, model: nn.Module, seqlen: int) -> None:
        """Hand the child the loaded model's attention (head size, dtype) at this window length; once."""
        try:
            config = model.config.get_text_config()
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dtype = next(model.parameters()).dtype   # of the forward passes
        except (AttributeError, TypeError, ZeroDivisionError, StopIteration):   # no attention to name
            self._send("")
            return
        self._send(f"{head_dim} {seqlen} {str(dtype).removeprefix('torch.')}\n")

    def _send(self, line: str) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(line.encode())
            stdin.close()
        except OSError:   # the child has ended (killed, or failed): the parent pays the costs, as without it
            pass

    def close(self) -> None:
        """End the child: long done after a full run; after an early error it must not linger.
        Triton writes each cache entry atomically, so a killed child leaves none half-written."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()


def start(device: torch.device, triton: Optional[tuple[bool, int, int, int]]) -> Optional[Warmup]:
    """Start the child on a CUDA device (None elsewhere, or when no interpreter can start).

    triton: (has_grid, prune_n, prune_m, block_size) of the solves that will run the fused loop,
    or None when none will; then this process also primes Triton's cache key (``prime_triton_key``).
    """
    if device.type != "cuda" or obs_kernel.interpreting():
        return None
    if triton is not None:
        prime_triton_key()
    index = device.index if device.index is not None else torch.cuda.current_device()
    args = ["--device", f"cuda:{index}"]
    if triton is not None and obs_kernel.triton_available():
        has_grid, prune_n, prune_m, block_size = triton
        args += ["--triton", f"{int(has_grid)},{prune_n},{prune_m},{block_size}"]
    # Imported by name from this directory, as the parent imports it: Triton's cache key holds the kernel's module.
    code = "import sys, warmup; sys.exit(warmup.main(sys.argv[1:]))"
    try:
        process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    return Warmup(process)


def prime_triton_key() -> Optional[threading.Thread]:
    """Compute, on a thread of this process, the key Triton gives its cache entries.

    A process's first kernel launch hashes Triton's own files first, libtriton.so included (0.46 s
    of the first solve in a second process on the H100 host, SmolLM2); the key is computed once per
    process (``functools.lru_cache``). File reads and hashlib's updates release the GIL, so a
    thread started before the load pays it while the loader runs. None without Triton (or without
    that function in this Triton version: the first launch pays it, as without this).
    """
    if not obs_kernel.triton_available():
        return None

    def prime() -> None:
        try:
            from triton.runtime.cache import triton_key
            triton_key()
        except Exception:   # noqa: BLE001 - nothing here may disturb the run: the first launch computes it, as without this
            return

    thread = threading.Thread(target=prime, name="triton-key", daemon=True)
    thread.start()
    return thread


def rehearse_attention(head_dim: int, seqlen: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One causal attention of this head size, window length and dtype, as the decoder layers run it.
    Returns its output: [1, 1, seqlen, head_dim], zeros (q = k = v = 0)."""
    q = torch.zeros(1, 1, seqlen, head_dim, dtype=dtype, device=device)   # [batch, heads, seqlen, head_dim]
    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """The child: compile Triton's forms, then rehearse the attention the parent names on stdin."""
    import argparse

    parser = argparse.ArgumentParser(description="Pay a run's one-time GPU costs into the on-disk caches.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--triton", help="has_grid,prune_n,prune_m,block_size of the fused solves")
    a = parser.parse_args(argv)
    if a.triton:
        has_grid, prune_n, prune_m, block_size = (int(v) for v in a.triton.split(","))
        obs_kernel.precompile(bool(has_grid), prune_n, prune_m, block_size, a.device)
    line = sys.stdin.readline().split()   # "head_dim seqlen dtype", or nothing
    if len(line) == 3:
        rehearse_attention(int(line[0]), int(line[1]), getattr(torch, line[2]), a.device)
    return 0
