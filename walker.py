"""The one layer walker: capture what every decoder layer receives, then replay layer by layer.

Calibration, compression and evaluation all go through ``LayerWalker``; no code here knows a model
family beyond ``get_decoder_layers`` and the head's logit soft-capping. Only the current layer
(plus, briefly, the embedding or the head) sits on the compute device, so a 13B model runs in the
memory of one layer and the activations.

    walker = LayerWalker(model, device)
    acts = walker.capture(input_ids)                 # [n, seqlen, hidden] + each layer's kwargs
    for i, layer in walker.layers():                 # layer i on the device
        stats = calibrate(layer, acts); compress(layer, stats)
        acts = walker.run(layer, acts)               # propagate the compressed outputs
    logits = walker.head(acts.hidden[k:k+1])

Layers are not all alike: Gemma-3 and Qwen2 give each layer the mask (sliding or full) and the
RoPE (local or global) of its layer type, so each layer is replayed with the kwargs it received
itself. A model whose layers cannot be replayed from per-layer kwargs is refused with a ValueError.
"""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed was seen."""


# Config attributes whose truthy value means layers depend on each other beyond the hidden state.
_UNREPLAYABLE_CONFIG = {"num_kv_shared_layers": "shares KV states across layers"}
# Values a kwarg may hold to be replayed for every window (besides tuples and lists of them).
_REPLAYABLE = (torch.Tensor, bool, int, float, str, type(None))


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM: ``model.model.layers`` (LLaMA, Vicuna, Mistral, Qwen2, Gemma-3, SmolLM)."""
    try:
        return model.model.layers
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no model.model.layers; unsupported architecture") from None


def _replayable(obj: Any) -> bool:
    """True for tensors, scalars, None and (nested) tuples or lists of them: no state to carry over."""
    if isinstance(obj, (tuple, list)):
        return all(_replayable(o) for o in obj)
    return isinstance(obj, _REPLAYABLE)


def _same(a: Any, b: Any) -> bool:
    """Equality of replayable kwarg values (tensors compared by value and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _to_device(module: nn.Module, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move a module's parameters and buffers to ``device``; returns (tensor, its CPU data) pairs to restore."""
    moved = []
    for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values():
        host = t.data
        t.data = host.to(device)
        moved.append((t, host))
    return moved


def _to_host(moved: list[tuple[torch.Tensor, torch.Tensor]], writeback: bool) -> None:
    """Point the tensors at their CPU data again; with writeback, copy what the device holds into it first."""
    for t, host in moved:
        if writeback and t.data is not host:
            if t.data.shape != host.shape or t.data.dtype != host.dtype:
                raise RuntimeError(f"a layer tensor changed from {host.dtype} {tuple(host.shape)} to "
                                   f"{t.data.dtype} {tuple(t.data.shape)} on the device")
            host.copy_(t.data)
        t.data = host


@dataclass
class Activations:
    hidden: torch.Tensor                 # [n, seqlen, hidden] in the model dtype, on the compute device
    layer_kwargs: list[dict[str, Any]]   # per decoder layer, what it receives besides hidden_states (batch 1)


AUTO_BATCH_BYTES = 512 << 20  # --batch_size auto: bytes of the widest activation [batch, seqlen, width] of a forward
AUTO_BATCH_MAX = 32  # --batch_size auto: most windows per forward
CPU_BATCH = 8  # --batch_size auto on the CPU


def auto_batch_size(model: nn.Module, seqlen: int, device: str | torch.device) -> int:
    """Windows per forward for ``--batch_size auto``.

    # b = max 2^i <= AUTO_BATCH_MAX  with  b * seqlen * max(in, out features of layer 0's linears) * elem <= AUTO_BATCH_BYTES

    On a GPU a small model's passes are bound by kernel launches, not arithmetic: larger batches
    launch fewer kernels (SmolLM2: 32 windows instead of 8). Vicuna-13B (13824) and LLaMA-7B
    (11008) at seqlen 2048 in fp16 get 8, as before. CPU_BATCH on the CPU.
    """
    if torch.device(device).type != "cuda":
        return CPU_BATCH
    layer = get_decoder_layers(model)[0]
    width = max((max(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, nn.Linear)),
                default=getattr(model.config, "hidden_size", 1))
    elem = next(model.parameters()).element_size()
    b = 1
    while 2 * b <= AUTO_BATCH_MAX and 2 * b * seqlen * width * elem <= AUTO_BATCH_BYTES:
        b *= 2
    return b


def activation_bytes(model: nn.Module, nsamples: int, seqlen: int) -> int:
    """Bytes of the calibration activations a walk holds on its device at once.

    # bytes = 2 (a layer's inputs and outputs, Activations.hidden and LayerWalker.run's outs) * n * seqlen * hidden * elem
    """
    hidden = model.get_input_embeddings().embedding_dim
    return 2 * nsamples * seqlen * hidden * next(model.parameters()).element_size()


class LayerWalker:
    """Streams a decoder stack one layer at a time over captured activations."""

    def __init__(self, model: nn.Module, device: str | torch.device, batch_size: int = 8,
                 offload: bool = True):
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" == the current device, cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size = batch_size
        self.offload = offload and next(model.parameters()).device != self.device
        self.decoder_layers = get_decoder_layers(model)

    def _refuse(self, reason: str) -> ValueError:
        return ValueError(f"{type(self.model).__name__} cannot be walked layer by layer: {reason}")

    def _index(self, layer: nn.Module) -> int:
        for i, m in enumerate(self.decoder_layers):
            if m is layer:
                return i
        raise ValueError(f"{type(layer).__name__} is not one of the model's decoder layers")

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> Activations:
        """Run the embedding part of the model and record what each decoder layer receives.

        input_ids: [n, seqlen]. Layer 0's hidden input is recorded for every window. Each layer's
        kwargs (its mask, RoPE, ...) are recorded once, from the first window run with every layer
        passing its input through, and replayed for all windows; kwargs shared by several layers stay
        shared objects. The KV cache is off (``use_cache=False``): a cache replayed for every window
        would grow with each call and corrupt attention.
        """
        config = self.model.config
        for attr, reason in _UNREPLAYABLE_CONFIG.items():
            if getattr(config, attr, None):
                raise self._refuse(f"it {reason} ({attr}={getattr(config, attr)})")
        on_device = [m for name, m in self.model.model.named_children() if name != "layers"]
        on_device.append(self.model.get_output_embeddings())
        for m in on_device:
            m.to(self.device)
        try:
            hidden = self._first_layer_inputs(input_ids)
            layer_kwargs, x, logits = self._trace(input_ids[0])
            # Kwargs recorded from one window are replayed for all: they must not depend on the tokens.
            other, _, _ = self._trace(input_ids[0].flip(-1))
            for i, (kw, kw_other) in enumerate(zip(layer_kwargs, other)):
                for key in sorted(kw.keys() | kw_other.keys()):
                    if not _same(kw.get(key), kw_other.get(key)):
                        raise self._refuse(f"decoder layer {i}'s {key!r} depends on the token ids")
            # With pass-through layers the model's logits are head(layer 0's input); the tolerance
            # (1% of the largest logit) allows for half-precision rounding, not for a missing scale.
            expected = logits.float()
            if (self._logits(x) - expected).abs().max() > 1e-2 * expected.abs().max():
                raise self._refuse("its LM head applies more than the final norm, lm_head and logit soft-capping")
        finally:
            if self.offload:
                for m in on_device:
                    m.to("cpu")
        return Activations(hidden, layer_kwargs)

    def _first_layer_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Layer 0's hidden input for every window of input_ids [n, seqlen] -> [n, seqlen, hidden]."""
        hidden: list[torch.Tensor] = []   # each [batch, seqlen, hidden]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        handle = self.decoder_layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for start in range(0, input_ids.shape[0], self.batch_size):   # the embeddings of a batch of windows
                try:
                    self.model(input_ids[start:start + self.batch_size].to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return torch.cat(hidden, dim=0)

    def _trace(self, row: torch.Tensor) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
        """One forward of window row [seqlen] with every decoder layer passing its input through.

        Returns each layer's kwargs, layer 0's hidden input [1, seqlen, hidden] and the model's
        logits [1, seqlen, vocab]. Refuses layers that get extra positional arguments, kwargs that
        cannot be replayed (a cache, a shared dict, ...) or hidden states changed between layers.
        """
        calls: list[tuple[int, tuple, dict[str, Any]]] = []

        def record(i: int) -> Callable[[nn.Module, tuple, dict], None]:
            return lambda module, args, kwargs: calls.append((i, args, kwargs))

        def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states   # transformers 5.x decoder layers return the hidden-state tensor

        patched: list[tuple[nn.Module, Optional[Callable], RemovableHandle]] = []   # (layer, own forward, hook)
        try:
            for i, layer in enumerate(self.decoder_layers):
                patched.append((layer, layer.__dict__.get("forward"),
                                layer.register_forward_pre_hook(record(i), with_kwargs=True)))
                layer.forward = passthrough
            logits = self.model(row.unsqueeze(0).to(self.device), use_cache=False).logits
        finally:
            for layer, forward, handle in patched:
                handle.remove()
                layer.__dict__.pop("forward", None)
                if forward is not None:   # e.g. an accelerate hook's wrapper
                    layer.forward = forward
        if [i for i, _, _ in calls] != list(range(len(self.decoder_layers))):
            raise self._refuse(f"its decoder layers are called in the order {[i for i, _, _ in calls]}, "
                               f"not once each in turn")
        _, args0, kwargs0 = calls[0]
        x = args0[0] if args0 else kwargs0["hidden_states"]   # [1, seqlen, hidden]
        layer_kwargs: list[dict[str, Any]] = []
        for i, args, kwargs in calls:
            if len(args) > 1:
                raise self._refuse(f"decoder layer {i} receives {len(args) - 1} positional arguments "
                                   f"besides the hidden states")
            # Each pass-through returns its input, so every layer must receive that very tensor.
            if (args[0] if args else kwargs["hidden_states"]) is not x:
                raise self._refuse(f"the hidden states are changed between decoder layers {i - 1} and {i}")
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            for k, v in kw.items():
                if not _replayable(v):
                    raise self._refuse(f"decoder layer {i} receives {k}={type(v).__name__}, which cannot be replayed")
            layer_kwargs.append(kw)
        return layer_kwargs, x, logits

    def layers(self, timer: Optional[Callable[[str], ContextManager]] = None,
               writeback: bool = True) -> Iterator[tuple[int, nn.Module]]:
        """Yield (index, layer) with the layer on the compute device; it goes back to the CPU afterwards.

        ``timer(stage)``: a context manager charged with the moves (stage "transfer"), e.g. a StageTimer.
        The layer's CPU tensors are kept while it is on the device, and on the way back its device
        tensors are copied into them (``writeback=False``: not copied, for a walk that only reads the
        layers, e.g. evaluation). ``Module.to("cpu")`` would allocate fresh host memory instead, which
        the kernel zeroes page by page: 756 ms against 59 ms for a Vicuna-13B layer on the H100 host.
        """
        timed = timer if timer is not None else (lambda stage: contextlib.nullcontext())
        for i, layer in enumerate(self.decoder_layers):
            if not self.offload:
                yield i, layer
                continue
            with timed("transfer"):
                host = _to_device(layer, self.device)
            try:
                yield i, layer
            finally:
                with timed("transfer"):
                    _to_host(host, writeback)

    @torch.no_grad()
    def run(self, layer: nn.Module, acts: Activations) -> Activations:
        """One layer's outputs for all windows, in mini-batches; its kwargs broadcast over the batch."""
        kwargs = acts.layer_kwargs[self._index(layer)]
        outs = torch.empty_like(acts.hidden)
        for start in range(0, acts.hidden.shape[0], self.batch_size):
            out = layer(acts.hidden[start:start + self.batch_size], **kwargs)
            outs[start:start + self.batch_size] = out[0] if isinstance(out, tuple) else out
        return Activations(outs, acts.layer_kwargs)

    @torch.no_grad()
    def feed(self, layer: nn.Module, acts: Activations, hook_module: nn.Module,
             fn: Callable[[torch.Tensor], None]) -> None:
        """Feed all windows through ``layer`` until ``hook_module`` receives its input; call fn on it.

        The forward pass stops at ``hook_module``, so the work after it in the layer is skipped.
        """
        kwargs = acts.layer_kwargs[self._index(layer)]

        def hook(module: nn.Module, args: tuple) -> None:
            fn(args[0])
            raise _StopForward

        handle = hook_module.register_forward_pre_hook(hook)
        try:
            for start in range(0, acts.hidden.shape[0], self.batch_size):
                try:
                    layer(acts.hidden[start:start + self.batch_size], **kwargs)
                except _StopForward:
                    pass
        finally:
            handle.remove()

    def _logits(self, hidden: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """hidden [..., hidden] -> logits [..., vocab] (float32), modules already on the device.

        final_norm=False: ``hidden`` already went through the final norm (a base model's output).
        """
        if final_norm:
            hidden = self.model.model.norm(hidden)
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap   # Gemma: logits = cap · tanh(logits / cap)
        return logits.float()

    @contextmanager
    def _head_on_device(self) -> Iterator[None]:
        norm, lm_head = self.model.model.norm, self.model.get_output_embeddings()
        norm.to(self.device)
        lm_head.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                norm.to("cpu")
                lm_head.to("cpu")

    @torch.no_grad()
    def head(self, hidden: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Final norm, LM head, logit soft-capping: hidden [b, seqlen, hidden] -> logits [b, seqlen, vocab] f32."""
        with self._head_on_device():
            return self._logits(hidden, final_norm)

    @torch.no_grad()
    def nll_sum(self, hidden: torch.Tensor, ids: torch.Tensor, chunk_tokens: int,
                final_norm: bool = True) -> torch.Tensor:
        """Summed next-token NLL (float64 scalar, on the CPU) of hidden [b, seqlen, hidden] against ids [b, seqlen].

        nll = sum_t -log softmax(head(h_t))[ids_{t+1}], the head (final norm, LM head, soft-capping) run
        on at most ``chunk_tokens`` positions at a time: memory grows with chunk_tokens × vocab, not
        b × seqlen × vocab. Per-token NLLs are summed in float64, so the chunking does not change the
        sum beyond the LM head's own rounding. final_norm=False: ``hidden`` is a base model's output.
        """
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        rows = max(1, chunk_tokens // max(1, ids.shape[1] - 1))   # whole windows per slice, else one window in pieces
        with self._head_on_device():
            for start in range(0, ids.shape[0], rows):
                h = hidden[start:start + rows, :-1].reshape(-1, hidden.shape[-1])   # [n, hidden]: positions with a next token
                target = ids[start:start + rows, 1:].reshape(-1).to(self.device)    # [n]
                for p in range(0, h.shape[0], chunk_tokens):
                    logits = self._logits(h[p:p + chunk_tokens].to(self.device), final_norm)   # [<= chunk, vocab]
                    nll = F.cross_entropy(logits, target[p:p + chunk_tokens], reduction="none")
                    total += nll.double().sum()
                    del logits, nll
        return total.cpu()
