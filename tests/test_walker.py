"""The layer walker reproduces the full model: logits, perplexity, and no KV-cache leakage."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import datautils
import eval_ppl
from walker import LayerWalker


def tiny_llama(use_cache: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_cache=use_cache)
    return LlamaForCausalLM(config).eval()


def layerwise_logits(model, ids, batch_size=2):
    walker = LayerWalker(model, "cpu", batch_size=batch_size)
    acts = walker.capture(ids)
    for _, layer in walker.layers():
        acts = walker.run(layer, acts)
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
    assert len(acts.layer_kwargs) == 2
    for kwargs in acts.layer_kwargs:
        cos, sin = kwargs["position_embeddings"]
        assert cos.shape[-2] == 16
        assert kwargs["use_cache"] is False
        assert all(kwargs[k] is None for k in ("cache", "past_key_values") if k in kwargs)
    # LLaMA's layers all get the same mask and RoPE: one shared object, not a copy per layer.
    assert acts.layer_kwargs[0]["position_embeddings"] is acts.layer_kwargs[1]["position_embeddings"]


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


def changed(model, before) -> list[str]:
    """Names of parameters and buffers (non-persistent ones too) that differ from the copy ``before``."""
    now = dict(model.named_parameters()) | dict(model.named_buffers())
    then = dict(before.named_parameters()) | dict(before.named_buffers())
    assert now.keys() == then.keys()
    return [k for k in now if not torch.equal(now[k], then[k])]


def test_walker_leaves_model_untouched():
    model = tiny_llama()
    before = copy.deepcopy(model)
    walker = LayerWalker(model, "cpu")
    acts = walker.capture(torch.randint(0, 128, (2, 8)))
    for _, layer in walker.layers():
        walker.feed(layer, acts, layer.mlp.down_proj, lambda x: None)
        acts = walker.run(layer, acts)
    walker.head(acts.hidden)
    assert changed(model, before) == []
    for layer in model.model.layers:   # the pass-through forwards and capture hooks are gone
        assert "forward" not in layer.__dict__ and not layer._forward_pre_hooks
    # The check can fail: a changed weight and a changed non-persistent buffer are both seen.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1
        model.model.rotary_emb.inv_freq[0] += 1
    assert changed(model, before) == ["model.layers.1.mlp.down_proj.weight", "model.rotary_emb.inv_freq"]


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


# --- moves between host and device keep the layer's own CPU storage ---------------------------------

def _snapshot(model):
    return {k: (v.clone(), v.data_ptr()) for k, v in model.model.layers.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("writeback", [True, False])
def test_moves_write_back_into_the_same_cpu_storage(writeback):
    from walker import _to_device, _to_host
    model = tiny_llama()
    before = _snapshot(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    replaced = {}
    for i, layer in enumerate(model.model.layers):
        moved = _to_device(layer, device)
        for name, p in layer.named_parameters():
            assert p.device.type == device.type
            assert torch.equal(p.data.cpu(), before[f"{i}.{name}"][0])
            if device.type == "cuda":
                assert p.data_ptr() != before[f"{i}.{name}"][1]
        layer.self_attn.q_proj.weight.data.mul_(2.0)                    # changed in place
        new = torch.full_like(layer.mlp.down_proj.weight.data, float(i + 1))
        layer.mlp.down_proj.weight.data = new                           # given new storage
        replaced[i] = new.cpu()
        _to_host(moved, writeback)
    after = model.model.layers.state_dict(keep_vars=True)
    for key, (old, ptr) in before.items():
        assert after[key].data_ptr() == ptr, key                        # the layer's own CPU storage again
        i = int(key.split(".")[0])
        expected = old
        if (writeback or device.type == "cpu") and key.endswith("self_attn.q_proj.weight"):
            expected = old * 2.0   # on the CPU the "device" tensor is the host tensor itself
        elif writeback and key.endswith("mlp.down_proj.weight"):
            expected = replaced[i]
        assert torch.equal(after[key].data, expected), key


def test_a_tensor_changing_shape_on_the_device_is_refused():
    from walker import _to_device, _to_host
    layer = tiny_llama().model.layers[0]
    moved = _to_device(layer, torch.device("cpu"))
    layer.mlp.up_proj.weight.data = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="changed"):
        _to_host(moved, writeback=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_walk_on_cuda_from_cpu_weights_reproduces_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (5, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    walker = LayerWalker(model, "cuda", batch_size=2)
    acts = walker.capture(ids)
    for _, layer in walker.layers():
        acts = walker.run(layer, acts)
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.testing.assert_close(walker.head(acts.hidden).cpu(), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width, seqlen, expected", [(13824, 2048, 8), (11008, 2048, 8), (1536, 2048, 32),
                                                     (1536, 4096, 32), (13824, 4096, 4), (13824, 65536, 1)])
def test_auto_batch_size_fits_the_activation_budget(width, seqlen, expected):
    from walker import AUTO_BATCH_BYTES, CPU_BATCH, auto_batch_size
    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=width, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).half()
    b = auto_batch_size(model, seqlen, "cuda")   # reads the shapes only: no GPU needed
    assert b == expected
    assert b == 1 or b * seqlen * width * 2 <= AUTO_BATCH_BYTES
    assert auto_batch_size(model, seqlen, "cpu") == CPU_BATCH
