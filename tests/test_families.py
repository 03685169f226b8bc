"""Layer-by-layer replay is exact for families whose layers differ (Gemma-3, Qwen2 sliding); others are refused."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (Gemma3ForCausalLM, Gemma3nForCausalLM, Gemma3nTextConfig, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import eval_ppl
from walker import Activations, LayerWalker

VOCAB = 128
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, use_cache=True)   # a cache-enabled config: the walker must switch it off


def tiny_gemma3(vocab_size: int = VOCAB) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab_size, num_hidden_layers=4, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=16,
                              final_logit_softcapping=3.0, **TINY)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():   # RMSNorm weights start at 0 (scale 1 + w); make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                         max_window_layers=2, **TINY)   # layers 0, 1 full; 2, 3 sliding
    return Qwen2ForCausalLM(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, **TINY)).eval()


FAMILIES = {"gemma3": tiny_gemma3, "qwen2": tiny_qwen2, "llama": tiny_llama}


def token_ids(n: int = 3, seqlen: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def layerwise_logits(walker: LayerWalker, acts: Activations) -> torch.Tensor:
    for _, layer in walker.layers():
        acts = walker.run(layer, acts)
    return walker.head(acts.hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_logits_equal_full_model(family):
    model = FAMILIES[family]()
    ids = token_ids()   # 48 tokens: longer than the sliding windows
    walker = LayerWalker(model, "cpu", batch_size=2)
    logits = layerwise_logits(walker, walker.capture(ids))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, sliding, full", [("gemma3", 0, 1), ("qwen2", 2, 1)])
def test_each_layer_gets_its_own_kwargs(family, sliding, full):
    model = FAMILIES[family]()
    ids = token_ids()
    walker = LayerWalker(model, "cpu")
    acts = walker.capture(ids)
    kw = acts.layer_kwargs
    assert len(kw) == len(walker.decoder_layers)
    sliding_mask, full_mask = kw[sliding]["attention_mask"], kw[full]["attention_mask"]   # full: None means causal
    assert sliding_mask is not None and (full_mask is None or not torch.equal(sliding_mask, full_mask))
    # Layers of one type share one mask object: memory does not grow with depth.
    assert kw[sliding]["attention_mask"] is kw[sliding + 1 if family == "qwen2" else 2]["attention_mask"]
    assert all(v is None for k in kw for key, v in k.items() if key in ("cache", "past_key_values"))
    if family == "gemma3":   # local vs global RoPE
        assert not torch.equal(kw[0]["position_embeddings"][0], kw[1]["position_embeddings"][0])
    # The old walker replayed layer 0's kwargs everywhere: that is measurably wrong here.
    old = layerwise_logits(walker, Activations(acts.hidden, [kw[0]] * len(kw)))
    with torch.no_grad():
        full_logits = model(ids, use_cache=False).logits
    assert (old - full_logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_layerwise_perplexity_equals_full_model(family):
    model = FAMILIES[family]()
    stream = token_ids(1, 4 * 40, seed=5)
    layerwise, n1 = eval_ppl.perplexity(model, stream, 40, "cpu", layerwise=True, batch_size=3)
    full, n2 = eval_ppl.perplexity(model, stream, 40, "cpu", layerwise=False, batch_size=3)
    assert n1 == n2 == 4
    assert abs(layerwise - full) / full < 1e-5


def test_run_refuses_a_foreign_layer():
    model = tiny_llama()
    walker = LayerWalker(model, "cpu")
    acts = walker.capture(token_ids(1, 8))
    with pytest.raises(ValueError, match="not one of the model's decoder layers"):
        walker.run(tiny_llama().model.layers[0], acts)


@pytest.mark.parametrize("kv_shared, reason", [
    (0, "decoder layer 0 receives 2 positional arguments besides the hidden states"),   # per-layer inputs
    (2, "it shares KV states across layers (num_kv_shared_layers=2)"),
])
def test_gemma3n_is_refused(kv_shared, reason):
    torch.manual_seed(0)
    config = Gemma3nTextConfig(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
                               num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                               num_kv_shared_layers=kv_shared, sliding_window=16, activation_sparsity_pattern=[0.0] * 4,
                               laurel_rank=4, altup_num_inputs=2, **TINY)
    with pytest.raises(ValueError) as e:
        LayerWalker(Gemma3nForCausalLM(config).eval(), "cpu").capture(token_ids(2, 20))
    assert str(e.value) == f"Gemma3nForCausalLM cannot be walked layer by layer: {reason}"


class ToyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states)


class ToyLM(nn.Module):
    """A causal LM whose decoder loop misbehaves in one named way ('ok' behaves)."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault
        self.config = SimpleNamespace(num_kv_shared_layers=2 if fault == "kv_sharing" else 0)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(16, 8)
        self.model.layers = nn.ModuleList([ToyLayer(), ToyLayer()])
        self.model.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 16)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, use_cache=False):
        h = self.model.embed_tokens(input_ids)
        shared = {}
        for i, layer in enumerate(self.model.layers[:1] if self.fault == "skip" else self.model.layers):
            kwargs = {"position_ids": torch.arange(input_ids.shape[1])[None], "use_cache": use_cache}
            if self.fault == "dict_kwarg":
                kwargs["shared_kv_states"] = shared
            if self.fault == "token_kwarg":
                kwargs["per_layer_input"] = self.model.embed_tokens(input_ids)
            h = layer(h, h[..., :1], **kwargs) if self.fault == "positional" else layer(h, **kwargs)
            if self.fault == "between":
                h = h * 2
        logits = self.lm_head(self.model.norm(h))
        return SimpleNamespace(logits=logits * 2 if self.fault == "head_scale" else logits)


@pytest.mark.parametrize("fault, reason", [
    ("kv_sharing", "shares KV states across layers"),
    ("dict_kwarg", "shared_kv_states=dict, which cannot be replayed"),
    ("token_kwarg", "'per_layer_input' depends on the token ids"),
    ("positional", "1 positional arguments besides the hidden states"),
    ("between", "hidden states are changed between decoder layers 0 and 1"),
    ("head_scale", "LM head applies more than"),
    ("skip", "decoder layers are called in the order [0], not once each in turn"),
])
def test_unreplayable_models_are_refused(fault, reason):
    model = ToyLM(fault)
    walker = LayerWalker(model, "cpu")
    with pytest.raises(ValueError, match="ToyLM cannot be walked layer by layer") as e:
        walker.capture(torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0)))
    assert reason in str(e.value) and "\n" not in str(e.value)
    for layer in model.model.layers:   # the pass-through forwards and hooks are gone again
        assert "forward" not in layer.__dict__ and not layer._forward_pre_hooks


def test_well_behaved_toy_is_walked():
    model = ToyLM("ok")
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    walker = LayerWalker(model, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(layerwise_logits(walker, walker.capture(ids)), model(ids).logits)


def test_cli_end_to_end_on_a_gemma3_directory(tmp_path, data_dir, smollm2, monkeypatch):
    import vicuna_mi
    model_dir = tmp_path / "tiny-gemma3"
    tiny_gemma3(vocab_size=49152).save_pretrained(model_dir, safe_serialization=True)
    smollm2.tokenizer.save_pretrained(model_dir)
    # Evaluate the compressed model both ways in one run: wrap perplexity to also run the other mode.
    both = []
    real = eval_ppl.perplexity

    def perplexity(model, *args, layerwise=True, **kwargs):
        result = real(model, *args, layerwise=layerwise, **kwargs)
        both.append((result[0], real(model, *args, layerwise=not layerwise, **kwargs)[0]))
        return result

    monkeypatch.setattr(eval_ppl, "perplexity", perplexity)
    out = tmp_path / "r.json"
    rc = vicuna_mi.main([str(model_dir), "c4", "--data_dir", data_dir, "--nsamples", "2", "--seqlen", "32",
                         "--eval", "wikitext2", "--eval_samples", "2", "--n_groups", "2", "--device", "cpu",
                         "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert math.isfinite(report["ppl"]["wikitext2"]) and report["ppl"]["wikitext2"] > 1
    assert report["sparsity"]["actual"] == pytest.approx(0.5, abs=0.02)
    assert abs(report["avg_bits"]["actual"] - 4.0) <= 0.01
    assert len(both) == 1
    layerwise, full = both[0]
    assert layerwise == report["ppl"]["wikitext2"]
    assert abs(layerwise - full) / full < 1e-4
