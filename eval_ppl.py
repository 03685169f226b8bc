"""Perplexity with the GPTQ/SparseGPT conventions: non-overlapping seqlen windows, mean token NLL.

ppl = exp( sum_windows nll_sum(window) / (windows * (seqlen - 1)) ), each window scored on its own
(no context carried across windows), exactly as the reference code's ``llama_eval``.

The loss is computed from the final hidden states in chunks of at most ``chunk_tokens`` positions
(``LayerWalker.nll_sum``), so memory does not grow with windows × seqlen × vocab: float32 logits of
8 windows × 2048 tokens would take 8.4 GB at Llama-3's 128,256-token vocabulary.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from walker import LayerWalker

CHUNK_TOKENS = 4096   # positions per LM-head call: 4096 × 128,256 float32 logits = 2.1 GB


def windows(token_ids: torch.Tensor, seqlen: int, limit: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows of a [1, N] stream -> [n, seqlen]; ``limit`` keeps the first ones."""
    n = token_ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"evaluation stream has {token_ids.numel()} tokens, fewer than seqlen={seqlen}")
    if limit is not None:
        n = min(n, limit)
    return token_ids.reshape(-1)[: n * seqlen].reshape(n, seqlen)


def _final_hidden(model: nn.Module, walker: LayerWalker, batch: torch.Tensor) -> torch.Tensor:
    """The base model's output (after its final norm) for batch [b, seqlen] -> [b, seqlen, hidden].

    One forward of the whole model, with the decoder's output taken by a hook on ``model.model`` and
    the logits computed for the last position only (``logits_to_keep=1``). Those logits check that
    the model's head is what the chunked loss applies (LM head and soft-capping); a model that scales
    its logits, say, is refused rather than scored wrongly.
    """
    captured: list[torch.Tensor] = []
    handle = model.model.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    try:
        expected = model(batch, use_cache=False, **kwargs).logits[:, -1:].float()   # [b, 1, vocab]
    finally:
        handle.remove()
    hidden = captured[0]
    # Same tolerance as the walker's capture: half-precision rounding, not a missing scale.
    if (walker.head(hidden[:, -1:], final_norm=False) - expected).abs().max() > 1e-2 * expected.abs().max():
        raise ValueError(f"{type(model).__name__}: its LM head applies more than lm_head and logit soft-capping "
                         f"to the decoder's output; the chunked loss would be wrong")
    return hidden


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int, device: str | torch.device,
               limit: Optional[int] = None, layerwise: bool = True, batch_size: int = 8,
               desc: str = "eval", chunk_tokens: int = CHUNK_TOKENS) -> tuple[float, int]:
    """Perplexity of ``model`` on a [1, N] stream; returns (ppl, windows used).

    layerwise=True streams the model one layer at a time through the walker (bounded memory);
    layerwise=False runs the whole model on ``device``, ``batch_size`` windows per forward. Either
    way the loss comes from the final hidden states, ``chunk_tokens`` positions at a time.
    """
    ids = windows(token_ids, seqlen, limit)
    total = torch.zeros((), dtype=torch.float64)
    if layerwise:
        walker = LayerWalker(model, device, batch_size=batch_size)
        acts = walker.capture(ids)
        for _, layer in tqdm(walker.layers(writeback=False), total=len(walker.decoder_layers), desc=desc, leave=False):
            acts = walker.run(layer, acts)
        total += walker.nll_sum(acts.hidden, ids, chunk_tokens)
    else:
        model.to(device)
        walker = LayerWalker(model, device, batch_size=batch_size, offload=False)   # for its head only
        for start in tqdm(range(0, ids.shape[0], batch_size), desc=desc, leave=False):
            batch = ids[start:start + batch_size].to(device)
            total += walker.nll_sum(_final_hidden(model, walker, batch), batch, chunk_tokens, final_norm=False)
    ppl = torch.exp(total / (ids.shape[0] * (seqlen - 1))).item()
    return ppl, ids.shape[0]
