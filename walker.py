"""The one layer walker: capture what the first decoder layer receives, then replay layer by layer.

Calibration, compression and evaluation all go through ``LayerWalker``; no code here knows a model
family beyond ``get_decoder_layers``. Only the current layer (plus, briefly, the embedding or the
head) sits on the compute device, so a 13B model runs in the memory of one layer and the
activations.

    walker = LayerWalker(model, device)
    acts = walker.capture(input_ids)                 # [n, seqlen, hidden], kwargs kept verbatim
    for i, layer in walker.layers():                 # layer i on the device
        stats = calibrate(layer, acts); compress(layer, stats)
        acts = walker.run(layer, acts)               # propagate the compressed outputs
    logits = walker.head(acts[k:k+1])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed was seen."""


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM: ``model.model.layers`` (LLaMA, Vicuna, Mistral, Qwen2, SmolLM)."""
    try:
        return model.model.layers
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no model.model.layers; unsupported architecture") from None


def _to(obj: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Activations:
    hidden: torch.Tensor          # [n, seqlen, hidden] in the model dtype, on the compute device
    kwargs: dict[str, Any]        # what layer 0 received besides hidden_states (mask, position_embeddings, ...)


class LayerWalker:
    """Streams a decoder stack one layer at a time over captured activations."""

    def __init__(self, model: nn.Module, device: str | torch.device, batch_size: int = 8,
                 offload: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.offload = offload and next(model.parameters()).device != self.device
        self.decoder_layers = get_decoder_layers(model)

    def _outer_modules(self) -> list[nn.Module]:
        inner = self.model.model
        return [m for name, m in inner.named_children() if name != "layers"]

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> Activations:
        """Run the embedding part of the model and record what the first layer receives.

        input_ids: [n, seqlen]. Keyword arguments are captured from the first window and reused for
        all (they only depend on the length); the KV cache is switched off, since a cache object
        replayed for every window would grow with each call and corrupt attention.
        """
        first = self.decoder_layers[0]
        captured: dict[str, Any] = {}
        hidden: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            hidden.append(x)
            if not captured:
                captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _StopForward

        outer = self._outer_modules()
        for m in outer:
            m.to(self.device)
        first.to(self.device)
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for row in input_ids:
                try:
                    self.model(row.unsqueeze(0).to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
            if self.offload:
                first.to("cpu")
                for m in outer:
                    m.to("cpu")
        # Never replay a cache: drop it whatever the model passed.
        captured["past_key_values"] = None
        captured["use_cache"] = False
        return Activations(torch.cat(hidden, dim=0), captured)

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """Yield (index, layer) with the layer on the compute device; it goes back to the CPU afterwards."""
        for i, layer in enumerate(self.decoder_layers):
            layer.to(self.device)
            try:
                yield i, layer
            finally:
                if self.offload:
                    layer.to("cpu")

    @torch.no_grad()
    def run(self, layer: nn.Module, acts: Activations) -> Activations:
        """One layer's outputs for all windows, in mini-batches; kwargs broadcast over the batch."""
        outs = torch.empty_like(acts.hidden)
        for start in range(0, acts.hidden.shape[0], self.batch_size):
            out = layer(acts.hidden[start:start + self.batch_size], **acts.kwargs)
            outs[start:start + self.batch_size] = out[0] if isinstance(out, tuple) else out
        return Activations(outs, acts.kwargs)

    @torch.no_grad()
    def feed(self, layer: nn.Module, acts: Activations, hook_module: nn.Module,
             fn: Callable[[torch.Tensor], None]) -> None:
        """Feed all windows through ``layer`` until ``hook_module`` receives its input; call fn on it.

        The forward pass stops at ``hook_module``, so the work after it in the layer is skipped.
        """
        def hook(module: nn.Module, args: tuple) -> None:
            fn(args[0])
            raise _StopForward

        handle = hook_module.register_forward_pre_hook(hook)
        try:
            for start in range(0, acts.hidden.shape[0], self.batch_size):
                try:
                    layer(acts.hidden[start:start + self.batch_size], **acts.kwargs)
                except _StopForward:
                    pass
        finally:
            handle.remove()

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden [b, seqlen, hidden] -> logits [b, seqlen, vocab] (float32)."""
        norm, lm_head = self.model.model.norm, self.model.get_output_embeddings()
        norm.to(self.device)
        lm_head.to(self.device)
        try:
            return lm_head(norm(hidden)).float()
        finally:
            if self.offload:
                norm.to("cpu")
                lm_head.to("cpu")


def walk(model: nn.Module, input_ids: torch.Tensor, device: str | torch.device,
         per_layer: Optional[Callable[[int, nn.Module, Activations], None]] = None,
         batch_size: int = 8) -> Activations:
    """Capture, then for each layer call ``per_layer(i, layer, acts)`` (may compress it) and propagate.

    The returned activations are the final hidden states (before the norm); with
    propagate-compressed semantics, layer i+1 sees the outputs of the already compressed layer i.
    """
    walker = LayerWalker(model, device, batch_size=batch_size)
    acts = walker.capture(input_ids)
    for i, layer in walker.layers():
        if per_layer is not None:
            per_layer(i, layer, acts)
        acts = walker.run(layer, acts)
    return acts
