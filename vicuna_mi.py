#!/usr/bin/env python3
"""Compress a LLaMA-family causal LM: SparseGPT pruning + mixed-precision quantization from MI channel groups.

    python vicuna_mi.py MODEL DATASET [--sparsity 0.5] [--target_avg_bits 4.0] [--n_groups 8] ...

This is the only file that reads arguments, seeds RNGs, sets torch flags, picks the device and
writes results; everything it calls takes explicit arguments.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from tqdm import tqdm

import channel_grouping
import checkpoint
import datautils
import eval_ppl
import mi_estimator
import modelutils
import quant
import sparsegpt
import warmup
from walker import Activations, LayerWalker, activation_bytes, auto_batch_size, get_decoder_layers

# Sub-layers that share an input, in the order of the forward pass (true-sequential): each group
# gets one Hessian and one SparseGPT call. Layers of other families fall back to one group per Linear.
FUSED_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class CompressConfig:
    model: str                          # hub id, directory, .gguf file, smollm2-135m or synthetic:NAME
    dataset: str                        # calibration set(s): c4, wikitext2, ptb or a mix like c4+ptb
    nsamples: int = 128                 # calibration windows
    seqlen: int = 2048                  # tokens per calibration and evaluation window
    seed: int = 0                       # RNG seed for calibration windows, clustering and random groups
    calib_split: str = "train"          # split of wikitext2/ptb to calibrate on: train | validation (c4: always train)
    sparsity: float = 0.5               # fraction of weights zeroed, in [0, 1)
    prunen: int = 0                     # N of N:M sparsity (0 = unstructured)
    prunem: int = 0                     # M of N:M sparsity
    method: str = "sparsegpt"           # sparsegpt | magnitude | wanda
    wbits: int = 16                     # uniform width when MI grouping is off (16 = no quantization)
    sym: bool = False                   # symmetric grids instead of asymmetric min-max
    percdamp: float = 0.01              # Hessian damping, fraction of mean(diag H)
    blocksize: int = 128                # SparseGPT block of columns (mask chosen per block)
    use_mi_grouping: bool = True        # per-group widths from MI channel groups
    grouping: str = "mi"                # mi | random | contiguous
    n_groups: int = 8                   # channel groups per sub-layer
    target_avg_bits: float = 4.0        # average width over all quantized weights
    bit_choices: tuple[int, ...] = (2, 3, 4, 6, 8)  # widths a group may take
    eval: tuple[str, ...] = ("wikitext2", "ptb", "c4")  # perplexity sets after compression
    eval_samples: Optional[int] = None  # windows per evaluation set (None = all)
    eval_layerwise: bool = True         # evaluate layer by layer (bounded memory) or as a whole model
    data_dir: Optional[str] = None      # local copy of the data sets (None = Hugging Face hub)
    device: str = "auto"                # cuda, cpu or auto
    dtype: str = "auto"                 # forward passes: auto | float16 | bfloat16 | float32 (auto: modelutils._default_dtype)
    batch_size: Optional[int] = None    # windows per forward pass of one layer (None = auto: walker.auto_batch_size)
    trust_remote_code: bool = False     # allow a model's own code from the hub
    revision: Optional[str] = None      # hub branch/commit (e.g. one that holds safetensors weights)
    out: Optional[str] = None           # JSON report path (default results/<run>.json)
    save: Optional[str] = None          # packed checkpoint directory (None = not saved)
    save_dense: Optional[str] = None    # fp16 Hugging Face checkpoint directory (None = not saved)

    @property
    def quantize(self) -> bool:
        return self.use_mi_grouping or self.wbits < quant.NO_QUANT_BITS

    @property
    def prune(self) -> bool:
        return self.sparsity > 0 or self.prunen > 0


class UsageError(ValueError):
    """A bad combination of options."""


def validate(cfg: CompressConfig) -> None:
    """Reject bad options before any work starts (each message is one line)."""
    if not 0 <= cfg.sparsity < 1:
        raise UsageError(f"--sparsity must lie in [0, 1), got {cfg.sparsity}")
    if cfg.wbits not in quant.VALID_BITS:
        raise UsageError(f"--wbits must be 2..8 or 16, got {cfg.wbits}")
    if (cfg.prunen > 0) != (cfg.prunem > 0) or cfg.prunen < 0 or cfg.prunen > cfg.prunem:
        raise UsageError(f"N:M sparsity needs 0 < N <= M, got --prunen {cfg.prunen} --prunem {cfg.prunem}")
    if cfg.prunen and cfg.sparsity:
        raise UsageError("give either --sparsity or --prunen/--prunem, not both")
    if cfg.prunen and cfg.method == "sparsegpt" and cfg.blocksize % cfg.prunem:
        raise UsageError(f"--blocksize {cfg.blocksize} must be a multiple of --prunem {cfg.prunem}")
    if cfg.method not in ("sparsegpt", "magnitude", "wanda"):
        raise UsageError(f"--method must be sparsegpt, magnitude or wanda, got {cfg.method}")
    if cfg.grouping not in ("mi", "random", "contiguous"):
        raise UsageError(f"--grouping must be mi, random or contiguous, got {cfg.grouping}")
    if cfg.nsamples < 1 or cfg.seqlen < 2:
        raise UsageError("--nsamples must be >= 1 and --seqlen >= 2")
    if cfg.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1 or auto, got {cfg.batch_size}")
    if cfg.blocksize < 1:
        raise UsageError(f"--blocksize must be >= 1, got {cfg.blocksize}")
    if not (math.isfinite(cfg.percdamp) and cfg.percdamp > 0):
        raise UsageError(f"--percdamp must be a positive fraction of mean(diag H), got {cfg.percdamp}")
    if cfg.eval_samples is not None and cfg.eval_samples < 1:
        raise UsageError(f"--eval_samples must be >= 1 (omit it to use every window), got {cfg.eval_samples}")
    if cfg.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: no CUDA device is available")
    if not math.isfinite(cfg.target_avg_bits):
        raise UsageError(f"--target_avg_bits must be a number, got {cfg.target_avg_bits}")
    if cfg.use_mi_grouping:
        if not cfg.bit_choices:
            raise UsageError("--bit_choices is empty")
        for b in cfg.bit_choices:
            if b not in quant.VALID_BITS:
                raise UsageError(f"--bit_choices: width {b} not supported (use 2..8 or 16)")
        lo, hi = min(cfg.bit_choices), max(cfg.bit_choices)
        if not lo <= cfg.target_avg_bits <= hi:
            raise UsageError(f"--target_avg_bits {cfg.target_avg_bits} lies outside the range of "
                             f"--bit_choices [{lo}, {hi}]")
        if len(set(cfg.bit_choices)) != len(cfg.bit_choices):
            raise UsageError(f"--bit_choices has a repeated width: {','.join(map(str, cfg.bit_choices))}")
        if cfg.n_groups < 1:
            raise UsageError(f"--n_groups must be >= 1, got {cfg.n_groups}")
    for name in cfg.eval:
        if name not in datautils.DATASETS:
            raise UsageError(f"--eval: unknown data set {name!r}; choose from {', '.join(datautils.DATASETS)}")


def check_model(cfg: CompressConfig, model: nn.Module) -> None:
    """Reject options that the loaded model's shapes can't satisfy, before any calibration."""
    linears = [m for m in get_decoder_layers(model).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"{type(model).__name__} has no linear sub-layers in its decoder layers")
    narrowest = min(m.in_features for m in linears)
    if cfg.use_mi_grouping and cfg.n_groups > narrowest:
        raise UsageError(f"--n_groups {cfg.n_groups} exceeds the {narrowest} input channels of the narrowest sub-layer")
    if cfg.prunem:
        odd = sorted({m.in_features for m in linears if m.in_features % cfg.prunem})
        if odd:
            raise UsageError(f"--prunen/--prunem {cfg.prunen}:{cfg.prunem}: sub-layers with {odd} input "
                             f"channels are not a multiple of M={cfg.prunem}")


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation can take on ``device`` now (None where it can't be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil  # installed with accelerate
    except ImportError:
        return None
    return psutil.virtual_memory().available


def check_memory(cfg: CompressConfig, model: nn.Module, device: torch.device) -> None:
    """Refuse, before calibration, windows whose activations alone exceed the device's free memory."""
    if not (cfg.prune or cfg.quantize):
        return
    need, free = activation_bytes(model, cfg.nsamples, cfg.seqlen), free_memory_bytes(device)
    if free is not None and need > free:
        raise UsageError(f"--nsamples {cfg.nsamples} x --seqlen {cfg.seqlen} need {_size(need)} of activations "
                         f"on {device.type}, more than the {_size(free)} free; lower --nsamples or --seqlen")


def _size(n: int) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def check_report_path(out: Path) -> None:
    """Reject a JSON report path (--out) that can't be written, before any work."""
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the report's file name")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"--out {out}: the file is not writable")
    ancestor = checkpoint.unwritable_ancestor(out)
    if ancestor is not None:
        raise UsageError(f"--out {out}: {ancestor} is not a writable directory")


def resolve_device(name: str) -> torch.device:
    """--device: auto is cuda when a GPU is present, else cpu."""
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def check_outputs(cfg: CompressConfig) -> None:
    """Reject bad --out/--save/--save_dense destinations before any work (each message is one line)."""
    if cfg.save and not (cfg.prune or cfg.quantize):
        raise UsageError("--save writes a compressed checkpoint but nothing is pruned or quantized; "
                         "use --save_dense for a plain fp16 copy")
    if cfg.save_dense and cfg.model.startswith("synthetic:"):
        raise UsageError("--save_dense: a synthetic model borrows a tokenizer larger than its vocabulary, "
                         "so its export would not be an ordinary checkpoint")
    if cfg.save and cfg.save_dense:
        a, b = Path(cfg.save).resolve(), Path(cfg.save_dense).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise UsageError("--save and --save_dense must be separate directories, neither inside the other")
    check_report_path(Path(cfg.out) if cfg.out else default_out(cfg))
    if cfg.save:
        checkpoint.check_destination(cfg.save, "--save", model=cfg.model)
    if cfg.save_dense:
        checkpoint.check_destination(cfg.save_dense, "--save_dense", dense=True, model=cfg.model)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageError, so they print as one line like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def parse_args(argv: Optional[list[str]] = None) -> CompressConfig:
    """Build the config from the command line; defaults live in CompressConfig only."""
    d = CompressConfig("", "")
    p = _Parser(description=__doc__.splitlines()[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="hub id, local directory (also a --save checkpoint), .gguf file, 'smollm2-135m' or 'synthetic:vicuna-13b'")
    p.add_argument("dataset", help="calibration data: c4, wikitext2, ptb or a mix such as c4+ptb")
    p.add_argument("--nsamples", type=int, default=d.nsamples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--calib_split", choices=datautils.CALIB_SPLITS, default=d.calib_split,
                   help="split of wikitext2/ptb for calibration (never test, the evaluated one; c4 always uses train)")
    p.add_argument("--sparsity", type=float, default=d.sparsity)
    p.add_argument("--prunen", type=int, default=d.prunen)
    p.add_argument("--prunem", type=int, default=d.prunem)
    p.add_argument("--method", default=d.method, help="sparsegpt | magnitude | wanda")
    p.add_argument("--wbits", type=int, default=d.wbits, help="uniform width with --use_mi_grouping 0")
    p.add_argument("--sym", type=int, choices=(0, 1), default=int(d.sym))
    p.add_argument("--percdamp", type=float, default=d.percdamp)
    p.add_argument("--blocksize", type=int, default=d.blocksize)
    p.add_argument("--use_mi_grouping", type=int, choices=(0, 1), default=int(d.use_mi_grouping))
    p.add_argument("--grouping", default=d.grouping, help="mi | random | contiguous")
    p.add_argument("--n_groups", type=int, default=d.n_groups)
    p.add_argument("--target_avg_bits", type=float, default=d.target_avg_bits)
    p.add_argument("--bit_choices", default=",".join(map(str, d.bit_choices)))
    p.add_argument("--eval", default=",".join(d.eval), help="comma list, or 'none'")
    p.add_argument("--eval_samples", type=int, default=d.eval_samples)
    p.add_argument("--eval_layerwise", type=int, choices=(0, 1), default=int(d.eval_layerwise))
    p.add_argument("--data_dir", default=d.data_dir)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", choices=("auto", *modelutils.DTYPES), default=d.dtype,
                   help="dtype of the model's forward passes (statistics stay float32)")
    p.add_argument("--batch_size", default="auto",
                   help="windows per forward pass, or auto (GPU: up to 32 as activations allow; CPU: 8)")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--revision", default=d.revision, help="hub branch or commit of MODEL")
    p.add_argument("--out", default=d.out)
    p.add_argument("--save", default=d.save, metavar="DIR",
                   help="write a packed checkpoint (loadable as MODEL or with checkpoint.load_compressed)")
    p.add_argument("--save_dense", default=d.save_dense, metavar="DIR",
                   help="write an ordinary fp16 Hugging Face checkpoint (e.g. for lm-eval)")
    a = p.parse_args(argv)
    try:
        bit_choices = tuple(int(b) for b in a.bit_choices.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"--bit_choices must be a comma list of integers, got {a.bit_choices!r}") from None
    if a.batch_size.strip().lower() == "auto":
        batch_size = None
    else:
        try:
            batch_size = int(a.batch_size)
        except ValueError:
            raise UsageError(f"--batch_size must be a positive integer or auto, got {a.batch_size!r}") from None
    for name in ("model", "dataset", "--data_dir", "--revision", "--out", "--save", "--save_dense"):
        value = getattr(a, name.removeprefix("--"))
        if value is not None and not value.strip():   # an unset shell variable must not fall back silently
            raise UsageError(f"{name} is empty")
    if not a.eval.strip():   # an unset shell variable must not skip the evaluation silently
        raise UsageError("--eval is empty; give a comma list of data sets, or none")
    evals = () if a.eval.strip().lower() == "none" else tuple(s.strip() for s in a.eval.split(","))
    if len(set(evals)) != len(evals):
        raise UsageError(f"--eval has a repeated data set: {a.eval}")
    return CompressConfig(
        model=a.model, dataset=a.dataset, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, calib_split=a.calib_split,
        sparsity=a.sparsity, prunen=a.prunen, prunem=a.prunem, method=a.method, wbits=a.wbits,
        sym=bool(a.sym), percdamp=a.percdamp, blocksize=a.blocksize,
        use_mi_grouping=bool(a.use_mi_grouping), grouping=a.grouping, n_groups=a.n_groups,
        target_avg_bits=a.target_avg_bits, bit_choices=bit_choices, eval=evals,
        eval_samples=a.eval_samples, eval_layerwise=bool(a.eval_layerwise), data_dir=a.data_dir,
        device=a.device, dtype=a.dtype, batch_size=batch_size, trust_remote_code=a.trust_remote_code,
        revision=a.revision, out=a.out, save=a.save, save_dense=a.save_dense)


class StageTimer:
    """Wall time per stage; synchronises CUDA so asynchronous kernels are charged to their stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def sublayer_groups(layer: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """Sub-layers of one decoder layer grouped by shared input, in forward order."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups, seen = [], set()
    for names in FUSED_GROUPS:
        if all(n in linears for n in names):
            groups.append([(n, linears[n]) for n in names])
            seen.update(names)
    groups += [[(n, m)] for n, m in linears.items() if n not in seen]
    return groups


def plan_quantization(cfg: CompressConfig, W: torch.Tensor, row_splits: list[int], H: torch.Tensor,
                      labels: Optional[torch.Tensor]) -> tuple[Optional[quant.QGrid], list[tuple[torch.Tensor, Optional[torch.Tensor], dict]]]:
    """The grid of the stacked sub-layers W [sum(row_splits), in] (one input: H [in, in], labels [in]),
    and per sub-layer its column widths, final labels and allocation record.

    Each sub-layer gets its own allocation, bitwise what it gets alone; the stacked form pays the
    launches and host reads of one sub-layer (``column_errors``' row sums, ``allocate_bits_many``'s
    knapsack tables, ``stacked_group_grid``).
    """
    cols = W.shape[1]
    if not cfg.use_mi_grouping:
        col_bits = torch.full((cols,), cfg.wbits, dtype=torch.long)
        if cfg.wbits >= quant.NO_QUANT_BITS:
            return None, [(col_bits, None, {}) for _ in row_splits]
        return quant.uniform_grid(W, cfg.wbits, cfg.sym), [(col_bits, torch.zeros(cols, dtype=torch.long), {}) for _ in row_splits]
    h_diag = torch.diag(H).float()
    keep = None
    if cfg.prune:  # the weights a Wanda-style score would keep: they decide the error of each width
        keep = torch.cat([~sparsegpt.prune_mask(sparsegpt.wanda_scores(W_s, H), cfg.sparsity, cfg.prunen, cfg.prunem, per_row=True)
                          for W_s in W.split(row_splits)])   # per sub-layer: each one's own top-k calls
    col_errors = channel_grouping.column_errors(W, h_diag, labels, cfg.n_groups, list(cfg.bit_choices), keep, cfg.sym,
                                                row_splits=row_splits)   # [S, in, C]
    allocs = channel_grouping.allocate_bits_many(col_errors, labels.cpu(), list(cfg.bit_choices), cfg.target_avg_bits,
                                                 device=W.device if W.is_cuda else None)   # knapsacks on the GPU
    grid = quant.stacked_group_grid(W, row_splits, [a.labels.to(W.device) for a in allocs], [a.group_bits for a in allocs], cfg.sym)
    return grid, [(a.col_bits.cpu(), a.labels.cpu(), {"group_bits": list(a.group_bits), "group_sizes": torch.bincount(a.labels).tolist(),
                                                      "est_error": a.est_error}) for a in allocs]


class Packer:
    """Packs compressed sub-layers (``checkpoint.pack_linear``) on a worker thread with its own CUDA stream.

    Packing is host-bound (~25 ms per sub-layer, 7 s of Vicuna-13B's 40 layers); on CUDA it runs
    while the main thread computes the next sub-layer's statistics. The worker waits for the
    weights on its stream and synchronises that stream before it lets go of them, so neither
    stream sees memory the other is still using. On the CPU, packing runs inline.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packer") if self.cuda else None
        # High priority: its small kernels go ahead of the statistics GEMMs queued on the main stream.
        self.stream = torch.cuda.Stream(device, priority=-1) if self.cuda else None
        self._gate = threading.Lock()   # held by the main thread in its host-bound stages (quiet)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """The packer starts no sub-layer meanwhile (one already started finishes).

        Packing is host work too, and in the host-bound stages (clustering, allocation: many small
        ops and host reads) the two threads take turns holding the GIL; outside them (statistics,
        the solve, propagation) the main thread mostly waits for the GPU. H100, SmolLM2 full
        length: 12.46 and 12.58 s of compression with the pause, 12.91 and 13.98 s without.
        """
        if self.pool is None:
            yield
            return
        with self._gate:
            yield

    def submit(self, *args, **kwargs) -> Future:
        """A future of ``checkpoint.pack_linear(*args, **kwargs)``."""
        if self.pool is None:
            future: Future = Future()
            future.set_result(checkpoint.pack_linear(*args, **kwargs))
            return future
        ready = torch.cuda.Event()
        ready.record()   # the weights are written on the main stream

        def task() -> checkpoint.PackedLinear:
            with self._gate:   # not while the main thread is in a quiet stage
                pass
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                packed = checkpoint.pack_linear(*args, **kwargs)
                self.stream.synchronize()
            return packed

        return self.pool.submit(task)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def finish_records(records: list[dict], futures: list[Future]) -> list[checkpoint.PackedLinear]:
    """Wait for the packed sub-layers and put their bytes into their records (effective bits)."""
    packed = [f.result() for f in futures]
    for record, p in zip(records, packed):
        rows, cols = record["shape"]
        record.update({"storage": p.storage, "packed_bytes": p.nbytes,
                       "effective_bits": 8 * p.nbytes / (rows * cols),   # bytes the checkpoint stores, per weight
                       "effective_bits_kept": 8 * p.nbytes / record["kept"] if record["kept"] else float("inf")})
    return packed


def compress_group(cfg: CompressConfig, group: list[tuple[str, nn.Linear]], stats: sparsegpt.InputStats,
                   timer: StageTimer, layer_idx: int, packer: Packer) -> tuple[list[dict], list[Future]]:
    """Prune and quantize the sub-layers that share ``stats``' input.

    Returns one record per sub-layer and a future of its packed form (on the compute device), whose
    bytes give the record's effective bits whether or not the run saves a checkpoint; the records
    are complete once ``finish_records`` has them.
    """
    with packer.quiet():   # host-bound stages: the packer waits (Packer.quiet)
        cols = stats.sum_xxT.shape[0]
        labels, silhouette = None, float("nan")
        if cfg.use_mi_grouping:
            if cfg.grouping == "mi":
                with timer("mi"):
                    cov = mi_estimator.covariance_from_sums(stats.sum_xxT, stats.sum_x, stats.num_samples)
                    affinity = mi_estimator.gaussian_mi(cov)
                    del cov
                with timer("clustering"):
                    grouping = channel_grouping.spectral_cluster(affinity, cfg.n_groups, seed=cfg.seed + layer_idx)
                    del affinity
            elif cfg.grouping == "random":
                grouping = channel_grouping.random_groups(cols, cfg.n_groups, seed=cfg.seed + layer_idx)
            else:
                grouping = channel_grouping.contiguous_groups(cols, cfg.n_groups)
            labels, silhouette = grouping.labels.to(stats.sum_xxT.device), grouping.silhouette
        H = stats.hessian(release=True)   # after the MI, which reads the sums: no second [in, in] matrix

        shapes = [tuple(m.weight.shape) for _, m in group]
        row_splits = [rows for rows, _ in shapes]
        W_all = torch.cat([m.weight.data for _, m in group], dim=0).float()   # [sum of rows, in]: the stacked sub-layers
        with timer("allocation"):
            grid, plans = plan_quantization(cfg, W_all, row_splits, H, labels)
    start = time.perf_counter()
    with timer("prune_quant"):
        # One grid for the fused call; the sub-layers' grids are views of its rows.
        ends = list(itertools.accumulate(row_splits))
        plans = [(None if grid is None else quant.QGrid(*(t[end - rows:end] for t in (grid.scale, grid.zero, grid.maxq))), *plan)
                 for rows, end, plan in zip(row_splits, ends, plans)]
        if cfg.method == "sparsegpt":
            result = sparsegpt.sparsegpt_solve(
                W_all, H, sparsity=cfg.sparsity, prune_n=cfg.prunen, prune_m=cfg.prunem,
                block_size=cfg.blocksize, percdamp=cfg.percdamp, grid=grid,
                row_splits=row_splits, name=f"layer {layer_idx} {group[0][0]}")
            W_new, mask = result.weight, result.mask
        else:  # magnitude / wanda: mask from scores, then round-to-nearest on the grid
            scores = sparsegpt.magnitude_scores(W_all) if cfg.method == "magnitude" else sparsegpt.wanda_scores(W_all, H)
            per_row = cfg.method == "wanda"
            mask = torch.cat([sparsegpt.prune_mask(s, cfg.sparsity, cfg.prunen, cfg.prunem, per_row)
                              for s in scores.split(row_splits)])
            W_new = torch.where(mask, torch.zeros_like(W_all), W_all)
            if grid is not None:
                W_new = quant.quantize_weight(W_new, grid)
    elapsed = time.perf_counter() - start
    records, packed, row = [], [], 0
    for (name, module), (rows, in_features), (sub_grid, col_bits, sub_labels, info) in zip(group, shapes, plans):
        sub_mask = mask[row:row + rows]
        # What the checkpoint stores: 16-bit columns rounded through fp16 (on a fp32 CPU model too), no -0.0.
        W_sub, W_model = checkpoint.storable(W_new[row:row + rows], col_bits, module.weight.dtype)
        module.weight.data.copy_(W_model)
        with timer("pack"):   # on CUDA only the hand-over to the packer's thread
            # Every packed sub-layer of a saved checkpoint is decoded and compared; otherwise the first
            # layer's are (a packing bug shows there) and the sizes come from the packed tensors.
            packed.append(packer.submit(name, W_sub, W_model, sub_mask, col_bits, sub_labels, sub_grid,
                                        cfg.prunen, cfg.prunem, verify=bool(cfg.save) or layer_idx == 0))
        n_zero = int((W_model == 0).sum())
        kept_per_col = (~sub_mask).sum(dim=0).double().cpu()          # [in] weights the solver kept
        n_kept = int(kept_per_col.sum())
        records.append({
            "layer": layer_idx, "name": name, "shape": [rows, in_features],
            "time_s": elapsed * rows / W_all.shape[0],
            "sparsity": n_zero / W_sub.numel(), "mask_sparsity": sub_mask.float().mean().item(),
            "bits": col_bits.double().mean().item(), "silhouette": silhouette,
            "kept": n_kept,   # kept_bits: mean column width over the kept weights
            "kept_bits": (kept_per_col @ col_bits.double()).item() / n_kept if n_kept else float("nan"),
            "bit_histogram": {int(b): int(c) for b, c in zip(*torch.unique(col_bits, return_counts=True))},
            **info})   # + storage, packed_bytes, effective_bits(_kept): finish_records
        row += rows
    return records, packed


# Decoder layers whose forward is  h = x + self_attn(input_layernorm(x)),  y = h + mlp(post_attention_layernorm(h)),
# with self_attn ending in o_proj: their statistics and propagate passes share work (_SharedPasses).
_SHARED_PASS_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


class _StopAt(Exception):
    """Ends a forward pass once a hooked module has received its input."""


class _SharedPasses:
    """The statistics and propagate passes of one LLaMA-style decoder layer, without recomputation.

    Fed through the walker, every group's pass reruns the layer up to its sub-layers: the gate/up
    pass reruns attention, the down pass attention and o_proj, the propagation everything. Here the
    o_proj pass keeps attention's output a [n, seqlen, o_in]; once o_proj is compressed,
    h = x + o_proj(a) overwrites x in place (nothing needs x again) and a is freed; the gate/up and
    down passes and the propagation start from h, and the layer's output overwrites h. The same
    operations run on the same values as in the layer's own forward, so no result changes.
    """

    def __init__(self, walker: LayerWalker, layer: nn.Module, acts: Activations):
        self.walker, self.layer, self.acts = walker, layer, acts
        self.attn_out: Optional[torch.Tensor] = None   # o_proj's input, from its pass until h is formed

    @staticmethod
    def applies(layer: nn.Module, groups: list[list[tuple[str, nn.Linear]]]) -> bool:
        return (type(layer).__name__ in _SHARED_PASS_LAYERS
                and [[name for name, _ in g] for g in groups] == [list(g) for g in FUSED_GROUPS])

    def _batches(self) -> list[slice]:
        n, b = self.acts.hidden.shape[0], self.walker.batch_size
        return [slice(start, start + b) for start in range(0, n, b)]

    @torch.no_grad()
    def feed(self, group_name: str, fn: Callable[[torch.Tensor], None]) -> None:
        """Call fn on the inputs of the group led by ``group_name``, batch by batch (walker.feed's order)."""
        layer, hidden = self.layer, self.acts.hidden
        if group_name == "self_attn.q_proj":
            self.walker.feed(layer, self.acts, layer.self_attn.q_proj, fn)
        elif group_name == "self_attn.o_proj":
            o_proj = layer.self_attn.o_proj
            self.attn_out = hidden.new_empty(*hidden.shape[:-1], o_proj.in_features)
            batches = iter(self._batches())

            def keep(a: torch.Tensor) -> None:
                self.attn_out[next(batches)] = a
                fn(a)

            self.walker.feed(layer, self.acts, o_proj, keep)
        elif group_name == "mlp.gate_proj":
            for s in self._batches():
                hidden[s].add_(layer.self_attn.o_proj(self.attn_out[s]))   # h = x + o_proj(a)
            self.attn_out = None
            for s in self._batches():
                fn(layer.post_attention_layernorm(hidden[s]))
        elif group_name == "mlp.down_proj":
            def stop(module: nn.Module, args: tuple) -> None:
                fn(args[0])
                raise _StopAt

            handle = layer.mlp.down_proj.register_forward_pre_hook(stop)
            try:
                for s in self._batches():
                    try:
                        layer.mlp(layer.post_attention_layernorm(hidden[s]))
                    except _StopAt:
                        pass
            finally:
                handle.remove()
        else:
            raise ValueError(f"no shared pass for {group_name}")

    @torch.no_grad()
    def propagate(self) -> Activations:
        """The layer's outputs, y = h + mlp(post_attention_layernorm(h)), written over h."""
        hidden = self.acts.hidden
        for s in self._batches():
            hidden[s].add_(self.layer.mlp(self.layer.post_attention_layernorm(hidden[s])))
        return self.acts


def compress_model(cfg: CompressConfig, model: nn.Module, calib: torch.Tensor, device: torch.device,
                   timer: StageTimer, writer: Optional[checkpoint.CheckpointWriter] = None,
                   shared_passes: bool = True, on_group: Optional[Callable[[int, str], None]] = None) -> list[dict]:
    """Walk the layers: statistics per input group, compress, then propagate the compressed outputs.

    With a ``writer``, each layer's packed sub-layers are written as soon as the layer is done.
    ``shared_passes``: LLaMA-style layers reuse attention's output across their passes (_SharedPasses)
    instead of rerunning the layer for each group. ``on_group(layer_idx, name)`` is called before each
    group's statistics (profiling).
    """
    walker = LayerWalker(model, device, batch_size=cfg.batch_size or auto_batch_size(model, cfg.seqlen, device))
    with timer("capture"):
        acts: Activations = walker.capture(calib)
    records: list[dict] = []
    packer = Packer(device)
    pending: list[tuple[list[dict], list[Future]]] = []   # sub-layers being packed

    def finish_pending() -> list[checkpoint.PackedLinear]:
        with timer("pack"):   # only the wait: the packing itself overlaps the next statistics pass
            done = [p for group_records, futures in pending for p in finish_records(group_records, futures)]
        pending.clear()
        return done

    try:
        bar = tqdm(walker.layers(timer), total=len(walker.decoder_layers), desc="compress", unit="layer")
        for i, layer in bar:
            layer_packed: list[checkpoint.PackedLinear] = []
            groups = sublayer_groups(layer)
            shared = _SharedPasses(walker, layer, acts) if shared_passes and _SharedPasses.applies(layer, groups) else None
            for group in groups:
                if on_group is not None:
                    on_group(i, group[0][0])
                stats = sparsegpt.InputStats(group[0][1].in_features, device)
                with timer("statistics"):
                    if shared is not None:
                        shared.feed(group[0][0], stats.add)
                    else:
                        walker.feed(layer, acts, group[0][1], stats.add)
                    stats.check()   # NaN/Inf inputs: one host read per pass (a read per batch stalls the GPU queue)
                layer_packed += finish_pending()   # the previous group's, before this one's memory peak
                group_records, futures = compress_group(cfg, group, stats, timer, i, packer)
                records += group_records
                pending.append((group_records, futures))
                del stats, futures
            if on_group is not None:
                on_group(i, "propagate")
            with timer("propagate"):
                acts = shared.propagate() if shared is not None else walker.run(layer, acts)
            del shared
            layer_packed += finish_pending()
            if writer is not None:
                with timer("save"):
                    writer.add_layer(i, layer_packed)
            del layer_packed
            bar.set_postfix(bits=f"{_weighted(records, 'bits'):.3f}", sparsity=f"{_weighted(records, 'sparsity'):.3f}")
    finally:
        packer.close()
    return records


# The stages of compress_model; with time_s.other (untimed glue) they add up to time_s.compression.
COMPRESS_STAGES = ("capture", "transfer", "statistics", "mi", "clustering", "allocation", "prune_quant", "pack", "propagate")


def _weighted(records: list[dict], key: str) -> float:
    """Average of a per-sub-layer figure weighted by the number of weights."""
    total = sum(r["shape"][0] * r["shape"][1] for r in records)
    return sum(r[key] * r["shape"][0] * r["shape"][1] for r in records) / total if total else float("nan")


def summarize(cfg: CompressConfig, records: list[dict], ppl: dict, windows: dict, times: dict) -> dict:
    report: dict = {"config": asdict(cfg), "versions": {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__}}
    report["ppl"] = ppl
    report["eval_windows"] = windows
    if records:
        hist: dict[int, int] = defaultdict(int)
        for r in records:
            for b, c in r["bit_histogram"].items():
                hist[b] += c
        n_cols = sum(hist.values())
        sil = [r["silhouette"] for r in records if not math.isnan(r["silhouette"])]
        report["sparsity"] = {"target": cfg.prunen / cfg.prunem if cfg.prunen else cfg.sparsity,
                              "actual": _weighted(records, "sparsity"), "mask": _weighted(records, "mask_sparsity")}
        report["avg_bits"] = {"target": cfg.target_avg_bits if cfg.use_mi_grouping else cfg.wbits,
                              "actual": _weighted(records, "bits"),   # mean column width over all positions
                              "kept": (sum(r["kept_bits"] * r["kept"] for r in records if r["kept"])
                                       / max(sum(r["kept"] for r in records), 1)),   # ... over the kept weights
                              "effective": _weighted(records, "effective_bits"),     # packed bytes per position
                              "effective_kept": 8 * sum(r["packed_bytes"] for r in records)
                                                / max(sum(r["kept"] for r in records), 1),
                              "max_sublayer_deviation": max(abs(r["bits"] - (cfg.target_avg_bits if cfg.use_mi_grouping else cfg.wbits)) for r in records)}
        report["bit_histogram_channels"] = {str(b): {"channels": c, "fraction": c / n_cols} for b, c in sorted(hist.items())}
        report["silhouette"] = {"mean": sum(sil) / len(sil), "min": min(sil), "max": max(sil)} if sil else None
    report["time_s"] = {"total": times.get("total", 0.0), **{k: v for k, v in times.items() if k != "total"}}
    # compression: the wall time of compress_model (less saving); other: what no stage timed (glue)
    report["time_s"]["compression"] = times.get("compression", sum(times.get(k, 0.0) for k in COMPRESS_STAGES))
    report["time_s"]["other"] = report["time_s"]["compression"] - sum(times.get(k, 0.0) for k in COMPRESS_STAGES)
    if report["time_s"]["compression"] and cfg.use_mi_grouping and cfg.grouping == "mi":
        report["time_s"]["mi_clustering_fraction"] = (times.get("mi", 0.0) + times.get("clustering", 0.0)) / report["time_s"]["compression"]
    report["layers"] = records
    return report


def layer_table(records: list[dict]) -> list[str]:
    """One line per decoder layer: widths, storage, sparsity, clustering quality and time of its sub-layers."""
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_layer[r["layer"]].append(r)
    lines = [f"{'layer':>5} {'avg bits':>8} {'sub-layer range':>15} {'effective':>9} {'zeros':>6} "
             f"{'silhouette':>10} {'widths (share of channels)':<34} {'time s':>6}"]
    for i, recs in sorted(by_layer.items()):
        bits = [r["bits"] for r in recs]
        hist: dict[int, int] = defaultdict(int)
        for r in recs:
            for b, c in r["bit_histogram"].items():
                hist[int(b)] += c
        total = sum(hist.values())
        widths = " ".join(f"{b}:{c / total:.0%}" for b, c in sorted(hist.items()))
        sil = [r["silhouette"] for r in recs if not math.isnan(r["silhouette"])]
        lines.append(f"{i:>5} {_weighted(recs, 'bits'):>8.3f} {min(bits):>7.3f}-{max(bits):<7.3f} "
                     f"{_weighted(recs, 'effective_bits'):>9.3f} {_weighted(recs, 'sparsity'):>6.3f} "
                     f"{(sum(sil) / len(sil)) if sil else float('nan'):>10.3f} {widths:<34} "
                     f"{sum(r['time_s'] for r in recs):>6.2f}")
    return lines


def print_summary(report: dict) -> None:
    cfg = report["config"]
    lines = [""] + layer_table(report["layers"]) if report["layers"] else [""]
    lines += ["", f"== {cfg['model']}  calib={cfg['dataset']} x{cfg['nsamples']}x{cfg['seqlen']}  "
                 f"method={cfg['method']}  sparsity={cfg['sparsity'] or (str(cfg['prunen']) + ':' + str(cfg['prunem']) if cfg['prunen'] else 0)}  "
                 + (f"MI groups={cfg['n_groups']} ({cfg['grouping']}) target={cfg['target_avg_bits']} bits {cfg['bit_choices']}"
                    if cfg["use_mi_grouping"] else f"wbits={cfg['wbits']}")]
    if "avg_bits" in report:
        a, s = report["avg_bits"], report["sparsity"]
        lines.append(f"avg bits   : {a['actual']:.4f} per position, {a['kept']:.4f} per kept weight "
                     f"(target {a['target']} per position, worst sub-layer off by {a['max_sublayer_deviation']:.4f})")
        lines.append(f"effective  : {a['effective']:.4f} bits/weight, {a['effective_kept']:.4f} per kept weight "
                     f"(packed bytes: codes + sparsity pattern + scales/zeros + group map)")
        if "size" in report:
            z = report["size"]
            lines.append(f"size       : {z['tensor_bytes'] / 2 ** 20:.1f} MiB of tensors vs {z['fp16_bytes'] / 2 ** 20:.1f} MiB "
                         f"in fp16 ({z['ratio_to_fp16']:.3f}x; other tensors in {z['other_tensor_dtype']})")
        lines.append(f"sparsity   : {s['actual']:.4f} zeros (mask {s['mask']:.4f}, target {s['target']})")
        hist = "  ".join(f"{b}b {v['fraction'] * 100:.1f}%" for b, v in report["bit_histogram_channels"].items())
        lines.append(f"channels   : {hist}")
        if report.get("silhouette"):
            sil = report["silhouette"]
            lines.append(f"silhouette : mean {sil['mean']:.3f}  min {sil['min']:.3f}  max {sil['max']:.3f}")
    t = report["time_s"]
    stages = "  ".join(f"{k} {v:.1f}s" for k, v in t.items() if k not in ("total", "compression", "mi_clustering_fraction") and v)
    lines.append(f"time       : total {t['total']:.1f}s, compression {t['compression']:.1f}s"
                 + (f" (MI+clustering {t['mi_clustering_fraction'] * 100:.1f}%)" if "mi_clustering_fraction" in t else ""))
    lines.append(f"stages     : {stages}")
    if report.get("device", {}).get("peak_memory_gib"):
        dev = report["device"]
        phases = [f"{k} {dev[f'peak_memory_gib_{k}']:.1f}" for k in ("compression", "evaluation") if dev.get(f"peak_memory_gib_{k}")]
        lines.append(f"GPU memory : peak {dev['peak_memory_gib']:.1f} GiB allocated on {dev['name']}"
                     + (f" ({', '.join(phases)})" if phases else ""))
    if report["ppl"]:
        lines.append("perplexity : " + "  ".join(f"{k} {v:.3f} ({report['eval_windows'][k]} windows)" for k, v in report["ppl"].items()))
    print("\n".join(lines), flush=True)


def default_out(cfg: CompressConfig) -> Path:
    model = re.sub(r"[^A-Za-z0-9.-]+", "_", Path(cfg.model).name if cfg.model.endswith(".gguf") else cfg.model)
    bits = f"mi{cfg.target_avg_bits:g}-{cfg.grouping}" if cfg.use_mi_grouping else f"w{cfg.wbits}"
    sp = f"{cfg.prunen}of{cfg.prunem}" if cfg.prunen else f"s{cfg.sparsity:g}"
    return Path("results") / f"{model}_{cfg.method}_{sp}_{bits}_{time.strftime('%Y%m%d-%H%M%S')}.json"


def run(cfg: CompressConfig) -> dict:
    validate(cfg)
    check_outputs(cfg)
    datautils.check_sources(cfg.dataset, cfg.eval, cfg.calib_split, cfg.data_dir, calibrates=cfg.prune or cfg.quantize)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = False  # Hessian and OBS math in true float32
    torch.backends.cudnn.allow_tf32 = False
    timer = StageTimer(device)
    t0 = time.perf_counter()
    # One-time GPU costs (Triton's kernel forms, cuDNN's attention kernel) are paid by a child process during the load.
    fused = cfg.method == "sparsegpt" and (cfg.prune or cfg.quantize)
    child = warmup.start(device, (cfg.quantize, cfg.prunen, cfg.prunem, cfg.blocksize) if fused else None)
    try:
        return _run(cfg, device, timer, t0, child)
    finally:
        if child is not None:
            child.close()


def _run(cfg: CompressConfig, device: torch.device, timer: StageTimer, t0: float, child: Optional[warmup.Warmup]) -> dict:
    with timer("load"):
        lm = modelutils.load_model(cfg.model, device=str(device), dtype=cfg.dtype,
                                   trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    model = lm.model
    check_model(cfg, model)
    check_memory(cfg, model, device)
    if child is not None:
        child.attention(model, cfg.seqlen)
    if cfg.batch_size is None:   # auto: resolved once, for the compression and the evaluation; the report shows it
        cfg = replace(cfg, batch_size=auto_batch_size(model, cfg.seqlen, device))
    # Evaluation streams are read before any compression, so a missing file or a too short stream
    # fails in seconds rather than after the heavy work.
    eval_ids = {}
    with timer("evaluation_data"):
        for name in cfg.eval:
            eval_ids[name] = lm.encode_ids(datautils.eval_tokens(name, lm.tokenizer, cfg.seqlen, cfg.data_dir))
            if eval_ids[name].numel() < cfg.seqlen:
                raise UsageError(f"--eval {name}: the stream has {eval_ids[name].numel()} tokens, "
                                 f"fewer than one window of --seqlen {cfg.seqlen}")
    records: list[dict] = []
    if cfg.prune or cfg.quantize:
        with timer("calibration_data"):
            calib = lm.encode_ids(datautils.calibration_windows(
                cfg.dataset, lm.tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.data_dir, split=cfg.calib_split))
        # An unfinished checkpoint stays in a temporary directory that is removed on failure.
        writer = checkpoint.CheckpointWriter(cfg.save, model) if cfg.save else None
        start = time.perf_counter()
        records = compress_model(cfg, model, calib, device, timer, writer=writer)
        timer._sync()
        timer.seconds["compression"] = time.perf_counter() - start - timer.seconds.get("save", 0.0)
    peaks = {"compression": _peak_gib(device, reset=True)}   # peak GPU memory of each phase
    ppl, windows = {}, {}
    for name, ids in eval_ids.items():
        with timer("evaluation"):
            ppl[name], windows[name] = eval_ppl.perplexity(
                model, ids, cfg.seqlen, device, limit=cfg.eval_samples, layerwise=cfg.eval_layerwise,
                batch_size=cfg.batch_size, desc=f"eval {name}")
    times = dict(timer.seconds)
    times["total"] = time.perf_counter() - t0
    report = summarize(cfg, records, ppl, windows, times)
    peaks["evaluation"] = _peak_gib(device)
    report["device"] = {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                        "peak_memory_gib": max(peaks.values()) if device.type == "cuda" else None,
                        "peak_memory_gib_compression": peaks["compression"] if records else None,
                        "peak_memory_gib_evaluation": peaks["evaluation"] if eval_ids else None}
    report["model"] = {"weights_format": lm.weights_format, "checkpoint_dtype": lm.checkpoint_dtype,
                       "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}   # dtype of the forward passes
    if records:
        report["size"] = checkpoint.size_report(model, records)
    if cfg.save:
        report["saved"] = str(writer.finish(model, lm.tokenizer, report, lm.fold_vocab))
    if cfg.save_dense:
        report["saved_dense"] = str(checkpoint.save_dense(model, lm.tokenizer, cfg.save_dense, {
            "config": report["config"], "ppl": report["ppl"], "avg_bits": report.get("avg_bits")}))
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    print(f"report     : {out}")
    return report


def _peak_gib(device: torch.device, reset: bool = False) -> Optional[float]:
    """Peak GPU memory allocated since the last reset, in GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


# OSError: a full disk or a destination that changed during the run, reported as one line too.
ERRORS = (UsageError, modelutils.ModelError, datautils.DataError, sparsegpt.CholeskyError, ValueError, OSError)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except ERRORS as e:
        print(f"vicuna_mi: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
