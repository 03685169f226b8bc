#!/usr/bin/env python3
"""Speed and memory of the whole compression (every stage after loading), evaluation off.

    python scripts/bench_speed.py --model synthetic:vicuna-13b --device cuda --out results/speed_vicuna13b.json
    python scripts/bench_speed.py --model synthetic:tiny --device cpu --out results/speed_tiny.json

Calibration windows are random token ids, so no tokenizer or data set is needed. Writes, per stage
and per sub-layer type (qkv, o, gate_up, down; "layer" for the propagation): wall time, peak GPU
memory (allocated) and peak host RSS. One layer (--compare_layer) is also solved with the plain
PyTorch column loop, outside the stage timings: the report gives the time ratio and the largest
relative weight difference between the two paths, and whether their masks agree (on the CPU the
fused loop runs only under TRITON_INTERPRET=1, slowly; otherwise both columns are the plain loop).

--baseline runs the code paths before issue 9 (walker passes per group, PyTorch column loop,
float32 statistics GEMMs) for before/after figures; --layers N keeps the first N decoder layers of
a synthetic model.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import modelutils  # noqa: E402
import obs_kernel  # noqa: E402
import sparsegpt  # noqa: E402
import vicuna_mi  # noqa: E402
import warmup  # noqa: E402

GIB = 2 ** 30
SUBLAYER_TYPES = {"self_attn.q_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up",
                  "mlp.down_proj": "down", "propagate": "layer"}
COMPRESS_STAGES = vicuna_mi.COMPRESS_STAGES


class HostMemory:
    """Peak resident set size of this process; resettable on Linux (/proc/self/clear_refs), else since start."""

    def __init__(self):
        self.resettable = Path("/proc/self/clear_refs").exists()

    def reset(self) -> None:
        if self.resettable:
            try:
                Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
            except OSError:
                self.resettable = False

    def peak_gib(self) -> float:
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB   # Linux: KiB


class ProfilingTimer(vicuna_mi.StageTimer):
    """StageTimer that also records peak GPU memory and host RSS, per stage and per (stage, sub-layer type).

    Peaks are reset when a stage starts; the peak reached between stages goes into the run's overall
    peak. ``excluded()`` leaves work out of every open stage's time and peaks (the plain-loop check).
    """

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.scope = "-"
        self.host = HostMemory()
        self.rows: dict[tuple[str, str], dict] = defaultdict(lambda: {"time_s": 0.0, "peak_gpu_gib": 0.0,
                                                                    "peak_rss_gib": 0.0, "calls": 0})
        self.peak_gpu_gib = 0.0
        self.peak_rss_gib = 0.0
        self._open: list[tuple[str, str]] = []   # (stage, scope) of the stages in progress, outermost first
        self._excluded_s = [0.0]                 # per open stage (plus the outside): seconds left out

    def _gpu_peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.device.type == "cuda" else 0.0

    def _fold_peaks(self) -> None:
        """Charge the peaks since the last reset to every open stage and to the run, then reset."""
        gpu, rss = self._gpu_peak_gib(), self.host.peak_gib()
        self.peak_gpu_gib, self.peak_rss_gib = max(self.peak_gpu_gib, gpu), max(self.peak_rss_gib, rss)
        for stage, scope in self._open:
            for key in ((stage, "all"), (stage, scope)):
                row = self.rows[key]
                row["peak_gpu_gib"], row["peak_rss_gib"] = max(row["peak_gpu_gib"], gpu), max(row["peak_rss_gib"], rss)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.host.reset()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        self._fold_peaks()
        key = (stage, self.scope)
        self._open.append(key)
        self._excluded_s.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start - self._excluded_s.pop()
            self._fold_peaks()
            self._open.pop()
            self.seconds[stage] += elapsed
            for k in ((stage, "all"), key):
                self.rows[k]["time_s"] += elapsed
                self.rows[k]["calls"] += 1

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Work inside is charged to no stage: neither its time nor its memory peaks."""
        self._sync()
        self._fold_peaks()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            self._excluded_s = [e + elapsed for e in self._excluded_s]
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.host.reset()

    def table(self) -> dict:
        by_stage = {s: dict(r) for (s, scope), r in self.rows.items() if scope == "all"}
        by_type: dict[str, dict] = defaultdict(dict)
        for (stage, scope), r in self.rows.items():
            if scope != "all":
                by_type[scope][stage] = dict(r)
        return {"per_stage": by_stage, "per_sublayer_type": dict(by_type)}


class PlainLoopCheck:
    """Wraps sparsegpt.sparsegpt_solve: in one decoder layer, each solve is repeated with the plain loop."""

    def __init__(self, timer: ProfilingTimer, layer: int, fused_ok: bool):
        self.timer, self.layer, self.fused_ok = timer, layer, fused_ok
        self.current_layer = -1
        self.solve = sparsegpt.sparsegpt_solve
        self.rows: list[dict] = []

    def on_group(self, layer: int, name: str) -> None:
        self.current_layer = layer
        self.timer.scope = SUBLAYER_TYPES.get(name, name)

    def _timed(self, **kw) -> tuple[sparsegpt.SolveResult, float]:
        self.timer._sync()
        start = time.perf_counter()
        res = self.solve(**kw)
        self.timer._sync()
        return res, time.perf_counter() - start

    def __call__(self, W: torch.Tensor, H: torch.Tensor, **kw) -> sparsegpt.SolveResult:
        if self.current_layer != self.layer:
            return self.solve(W, H, **kw)
        fused, fused_s = self._timed(W=W, H=H, fused=True if self.fused_ok else False, **kw)
        with self.timer.excluded():
            plain, plain_s = self._timed(W=W, H=H, fused=False, **kw)
            diff = (fused.weight.float() - plain.weight.float())
            ref = plain.weight.float()
            self.rows.append({
                "sublayer": self.timer.scope, "shape": list(W.shape), "fused_available": self.fused_ok,
                "fused_s": fused_s, "plain_s": plain_s, "ratio_plain_over_fused": plain_s / fused_s,
                "same_mask": bool(torch.equal(fused.mask, plain.mask)),
                "mask_mismatches": int((fused.mask != plain.mask).sum()),
                "rel_diff_fro": (diff.norm() / ref.norm()).item(),
                "max_abs_diff_over_max_abs_w": (diff.abs().max() / ref.abs().max()).item(),
                "elements_differing": (diff != 0).float().mean().item()})
            del plain, diff, ref
        return fused


def load(name: str, device: torch.device, dtype: str, layers: Optional[int]) -> torch.nn.Module:
    """The model on the CPU in its forward dtype; synthetic shapes are filled on ``device``."""
    torch_dtype = modelutils._default_dtype(str(device), dtype)
    if name.startswith("synthetic:"):
        shape = name.split(":", 1)[1]
        if shape not in modelutils.SYNTHETIC_SHAPES:
            raise vicuna_mi.UsageError(f"unknown synthetic model {shape!r}; choose from {', '.join(modelutils.SYNTHETIC_SHAPES)}")
        if layers is not None:   # the same shapes with fewer decoder layers
            cut = f"{shape}-{layers}layers"
            modelutils.SYNTHETIC_SHAPES[cut] = (layers, *modelutils.SYNTHETIC_SHAPES[shape][1:])
            shape = cut
        return modelutils.synthetic_model(shape, dtype=torch_dtype, init_device=str(device) if device.type == "cuda" else "cpu")
    if layers is not None:
        raise vicuna_mi.UsageError("--layers applies to synthetic models only")
    return modelutils.load_model(name, device=str(device), dtype=torch_dtype).model


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", required=True, help="synthetic:NAME (no downloads) or anything vicuna_mi.py loads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--target_avg_bits", type=float, default=4.0)
    p.add_argument("--n_groups", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=None, help="windows per forward (default: auto, as vicuna_mi.py)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--layers", type=int, help="keep the first N decoder layers (synthetic models)")
    p.add_argument("--compare_layer", type=int, default=1, help="layer solved with both loops (-1: none)")
    p.add_argument("--baseline", action="store_true",
                   help="the paths before issue 9: walker passes, PyTorch column loop, float32 statistics")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = False   # as vicuna_mi.run: Hessian and OBS math in true float32
    torch.backends.cudnn.allow_tf32 = False
    cfg = vicuna_mi.CompressConfig(model=a.model, dataset="random-ids", nsamples=a.nsamples, seqlen=a.seqlen,
                                   seed=a.seed, sparsity=a.sparsity, target_avg_bits=a.target_avg_bits,
                                   n_groups=a.n_groups, batch_size=a.batch_size, eval=(), device=a.device,
                                   dtype=a.dtype)
    vicuna_mi.validate(cfg)
    device = vicuna_mi.resolve_device(a.device)
    if a.layers is not None and a.layers < 1:
        raise vicuna_mi.UsageError(f"--layers must be >= 1, got {a.layers}")
    vicuna_mi.check_report_path(Path(a.out))
    t0 = time.perf_counter()
    # As vicuna_mi.run: Triton's forms and cuDNN's attention kernel compile in a child process during the load.
    child = None if a.baseline else warmup.start(device, (True, 0, 0, cfg.blocksize))
    model = load(a.model, device, a.dtype, a.layers)
    if child is not None:
        child.attention(model, a.seqlen)
    load_s = time.perf_counter() - t0
    vicuna_mi.check_model(cfg, model)
    vicuna_mi.check_memory(cfg, model, device)
    n_layers = len(model.model.layers)
    calib = torch.randint(0, model.config.vocab_size, (a.nsamples, a.seqlen),
                          generator=torch.Generator().manual_seed(a.seed))

    timer = ProfilingTimer(device)
    fused_ok = obs_kernel.usable(torch.empty(0, device=device))   # CUDA + Triton, or the CPU under TRITON_INTERPRET=1
    compare_layer = a.compare_layer if 0 <= a.compare_layer < n_layers else None
    check = PlainLoopCheck(timer, compare_layer if compare_layer is not None else -1, fused_ok and not a.baseline)
    solve = sparsegpt.sparsegpt_solve
    if a.baseline:
        sparsegpt._gram_mode = "float32"
        sparsegpt.sparsegpt_solve = lambda W, H, **kw: solve(W, H, **{**kw, "fused": False})
    if compare_layer is not None and not a.baseline:
        sparsegpt.sparsegpt_solve = check
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        records = vicuna_mi.compress_model(cfg, model, calib, device, timer, shared_passes=not a.baseline,
                                           on_group=check.on_group)
    finally:
        sparsegpt.sparsegpt_solve = solve
    wall_s = time.perf_counter() - start
    if child is not None:
        child.close()   # done long before
    timer._fold_peaks()

    stages = {k: v for k, v in timer.seconds.items()}
    report = {
        "model": a.model, "layers": n_layers, "baseline": a.baseline, "config": vars(a),
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                   "torch": torch.__version__, "fused_loop": fused_ok and not a.baseline,
                   "gram_mode": sparsegpt._gram_mode},
        "load_s": load_s,
        "compression_s": sum(stages.get(k, 0.0) for k in COMPRESS_STAGES),
        "compression_wall_s": wall_s,   # includes the excluded plain-loop check and untimed glue
        "plain_loop_check_s": timer._excluded_s[0],
        "untimed_s": wall_s - timer._excluded_s[0] - sum(stages.get(k, 0.0) for k in COMPRESS_STAGES),
        "per_layer_s": sum(stages.get(k, 0.0) for k in COMPRESS_STAGES if k != "capture") / n_layers,
        "peak_gpu_gib": timer.peak_gpu_gib, "peak_rss_gib": timer.peak_rss_gib,
        "rss_peak_resettable": timer.host.resettable,
        "stages_s": stages, **timer.table(),
        "plain_loop_check": {"layer": compare_layer, "sublayers": check.rows},
        "sparsity": vicuna_mi._weighted(records, "sparsity") if records else None,
        "avg_bits": vicuna_mi._weighted(records, "bits") if records else None,
    }
    if check.rows:
        rows = check.rows
        report["plain_loop_check"].update({
            "fused_s": sum(r["fused_s"] for r in rows), "plain_s": sum(r["plain_s"] for r in rows),
            "ratio_plain_over_fused": sum(r["plain_s"] for r in rows) / sum(r["fused_s"] for r in rows),
            "same_masks": all(r["same_mask"] for r in rows),
            "largest_rel_diff_fro": max(r["rel_diff_fro"] for r in rows)})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"report: {out}")
    return report


def print_report(r: dict) -> None:
    print(f"\n== {r['model']} ({r['layers']} layers) on {r['device']['name']}"
          f"{' [baseline]' if r['baseline'] else ''}: compression {r['compression_s']:.1f}s "
          f"({r['per_layer_s']:.2f}s/layer + capture), load {r['load_s']:.1f}s, "
          f"peak GPU {r['peak_gpu_gib']:.2f} GiB, peak RSS {r['peak_rss_gib']:.2f} GiB")
    print(f"wall {r['compression_wall_s']:.1f}s = stages {r['compression_s']:.1f}s + untimed glue "
          f"{r['untimed_s']:.1f}s + plain-loop check {r['plain_loop_check_s']:.1f}s")
    print(f"{'stage':<12} {'time s':>8} {'GPU GiB':>8} {'RSS GiB':>8}   per sub-layer type (s)")
    for stage, row in sorted(r["per_stage"].items(), key=lambda kv: -kv[1]["time_s"]):
        types = "  ".join(f"{t} {stages[stage]['time_s']:.2f}" for t, stages in r["per_sublayer_type"].items()
                          if stage in stages and t != "-")
        print(f"{stage:<12} {row['time_s']:>8.2f} {row['peak_gpu_gib']:>8.2f} {row['peak_rss_gib']:>8.2f}   {types}")
    c = r["plain_loop_check"]
    if c.get("sublayers"):
        if not c["sublayers"][0]["fused_available"]:
            print("fused loop not available on this device: both columns are the plain loop")
        print(f"plain loop, layer {c['layer']}: {c['plain_s']:.2f}s vs fused {c['fused_s']:.2f}s "
              f"({c['ratio_plain_over_fused']:.1f}x), same masks {c['same_masks']}, "
              f"largest relative difference {c['largest_rel_diff_fro']:.2e}")
        for row in c["sublayers"]:
            print(f"  {row['sublayer']:<8} {row['shape']}  plain {row['plain_s']:.3f}s fused {row['fused_s']:.3f}s  "
                  f"mask mismatches {row['mask_mismatches']}  rel diff {row['rel_diff_fro']:.2e}  "
                  f"max |dW|/max|W| {row['max_abs_diff_over_max_abs_w']:.2e}")


def cli(argv: Optional[list[str]] = None) -> int:
    """main with vicuna_mi's error contract: a bad input is one line on stderr and exit status 2."""
    try:
        main(argv)
    except vicuna_mi.ERRORS as e:
        print(f"bench_speed: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
