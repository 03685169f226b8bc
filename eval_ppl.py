"""Perplexity with the GPTQ/SparseGPT conventions: non-overlapping seqlen windows, mean token NLL.

ppl = exp( sum_windows nll_sum(window) / (windows * (seqlen - 1)) ), each window scored on its own
(no context carried across windows), exactly as the reference code's ``llama_eval``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from walker import LayerWalker


def windows(token_ids: torch.Tensor, seqlen: int, limit: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows of a [1, N] stream -> [n, seqlen]; ``limit`` keeps the first ones."""
    n = token_ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"evaluation stream has {token_ids.numel()} tokens, fewer than seqlen={seqlen}")
    if limit is not None:
        n = min(n, limit)
    return token_ids.reshape(-1)[: n * seqlen].reshape(n, seqlen)


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64) of logits [b, seqlen, vocab] against ids [b, seqlen]."""
    shift = logits[:, :-1, :].float()
    target = ids[:, 1:].to(shift.device)
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum").double()


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int, device: str | torch.device,
               limit: Optional[int] = None, layerwise: bool = True, batch_size: int = 8,
               desc: str = "eval") -> tuple[float, int]:
    """Perplexity of ``model`` on a [1, N] stream; returns (ppl, windows used).

    layerwise=True streams the model one layer at a time through the walker (bounded memory);
    layerwise=False runs the whole model on ``device`` in one forward per window.
    """
    ids = windows(token_ids, seqlen, limit)
    total = torch.zeros((), dtype=torch.float64)
    if layerwise:
        walker = LayerWalker(model, device, batch_size=batch_size)
        acts = walker.capture(ids)
        for _, layer in tqdm(walker.layers(), total=len(walker.decoder_layers), desc=desc, leave=False):
            acts = walker.run(layer, acts)
        for start in range(0, ids.shape[0], batch_size):
            logits = walker.head(acts.hidden[start:start + batch_size])
            total += _nll_sum(logits, ids[start:start + batch_size]).cpu()
    else:
        model.to(device)
        for start in tqdm(range(0, ids.shape[0], batch_size), desc=desc, leave=False):
            batch = ids[start:start + batch_size].to(device)
            logits = model(batch, use_cache=False).logits
            total += _nll_sum(logits, batch).cpu()
    ppl = torch.exp(total / (ids.shape[0] * (seqlen - 1))).item()
    return ppl, ids.shape[0]
