"""The layer walker reproduces the full model: logits, perplexity, and no KV-cache leakage."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import datautils
import eval_ppl
from walker import LayerWalker, walk


def tiny_llama(use_cache: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_cache=use_cache)
    return LlamaForCausalLM(config).eval()


def layerwise_logits(model, ids, batch_size=2):
    walker = LayerWalker(model, "cpu", batch_size=batch_size)
    acts = walk(model, ids, "cpu", batch_size=batch_size)
    return walker.head(acts.hidden)


def test_identity_walk_reproduces_full_model_logits():
    model = tiny_llama()
    ids = torch.randint(0, 128, (5, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(layerwise_logits(model, ids), full, rtol=1e-5, atol=1e-5)


def test_captured_kwargs_hold_positions_and_no_cache():
    model = tiny_llama(use_cache=True)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    acts = LayerWalker(model, "cpu").capture(ids)
    assert acts.hidden.shape == (3, 16, 64)
    assert "position_embeddings" in acts.kwargs
    cos, sin = acts.kwargs["position_embeddings"]
    assert cos.shape[-2] == 16
    assert acts.kwargs["past_key_values"] is None and acts.kwargs["use_cache"] is False


def test_cache_enabled_model_replays_identically():
    # A model whose config turns the KV cache on must give the same logits for every window,
    # however many windows were replayed before it (a replayed cache would grow and corrupt attention).
    model = tiny_llama(use_cache=True)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    ids[3] = ids[0]
    logits = layerwise_logits(model, ids, batch_size=1)
    torch.testing.assert_close(logits[3], logits[0])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_walker_leaves_model_weights_untouched():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    layerwise_logits(model, torch.randint(0, 128, (2, 8)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4"])
def test_layerwise_perplexity_equals_full_model(smollm2, data_dir, name):
    ids = datautils.eval_tokens(name, smollm2.tokenizer, 64, data_dir)
    layerwise, n1 = eval_ppl.perplexity(smollm2.model, ids, 64, "cpu", limit=3, layerwise=True)
    full, n2 = eval_ppl.perplexity(smollm2.model, ids, 64, "cpu", limit=3, layerwise=False)
    assert n1 == n2 == 3
    assert abs(layerwise - full) / full < 1e-4
    assert 1 < full < 1e4


def test_perplexity_matches_manual_nll():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    ppl, n = eval_ppl.perplexity(model, ids, 16, "cpu")
    assert n == 2
    windows = ids[0, :32].reshape(2, 16)
    with torch.no_grad():
        out = model(windows, labels=windows, use_cache=False)
    assert abs(ppl - torch.exp(out.loss).item()) < 1e-4 * ppl


def test_windows_rejects_short_stream():
    with pytest.raises(ValueError, match="fewer than seqlen"):
        eval_ppl.windows(torch.arange(10).unsqueeze(0), 16)
