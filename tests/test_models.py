"""Model loading: the built-in SmolLM2 against its GGUF file, synthetic shapes, clear errors."""
import pytest
import torch

import modelutils


def test_synthetic_vicuna13b_has_the_real_shapes_on_meta():
    from transformers import LlamaForCausalLM

    # the module tree without weights: every shape of Vicuna-13B-v1.5, no memory needed
    config = modelutils.synthetic_config("vicuna-13b")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert len(model.model.layers) == 40
    layer = model.model.layers[39]
    assert layer.self_attn.q_proj.weight.shape == (5120, 5120)
    assert layer.mlp.gate_proj.weight.shape == (13824, 5120)
    assert layer.mlp.down_proj.weight.shape == (5120, 13824)
    assert model.lm_head.weight.shape == (32000, 5120)
    assert sum(p.numel() for p in model.parameters()) == 13_015_864_320


def test_synthetic_tiny_builds_with_random_weights_and_folds_tokens():
    lm = modelutils.load_model("synthetic:tiny")
    assert lm.model.config.vocab_size == 32000
    w = lm.model.model.layers[0].self_attn.q_proj.weight
    assert abs(w.std().item() - 0.02) < 0.005
    ids = torch.tensor([[5, 40000]])
    assert lm.encode_ids(ids).max() < 32000
    with torch.no_grad():
        out = lm.model(lm.encode_ids(ids)).logits
    assert torch.isfinite(out).all()


def test_builtin_model_holds_the_gguf_files_own_weights(smollm2):
    # The converted model must equal what the GGUF file itself stores, read and dequantized by the
    # gguf package independently of transformers' converter (un-permuted tensors: v, o, MLP, norms).
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.model.config.num_hidden_layers == 30 and smollm2.model.config.hidden_size == 576
    reader = gguf.GGUFReader(str(modelutils.smollm2_gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    params = dict(smollm2.model.named_parameters())
    pairs = {"blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
             "blk.7.attn_output.weight": "model.layers.7.self_attn.o_proj.weight",
             "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
             "blk.3.ffn_gate.weight": "model.layers.3.mlp.gate_proj.weight",
             "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
             "token_embd.weight": "model.embed_tokens.weight"}
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(params[hf_name].shape)
        assert torch.equal(params[hf_name].detach(), ref), hf_name
    # and a different tensor of the file is not equal (the comparison can fail)
    t = tensors["blk.1.attn_v.weight"]
    other = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float().reshape(params["model.layers.0.self_attn.v_proj.weight"].shape)
    assert not torch.equal(params["model.layers.0.self_attn.v_proj.weight"].detach(), other)
    assert (modelutils.convert_gguf(modelutils.smollm2_gguf_path()) / "model.safetensors").is_file()


@pytest.mark.parametrize("name, match", [
    ("/no/such/dir", "model not found"),
    ("missing-file.gguf", "model file not found"),
    ("synthetic:gpt5", "unknown synthetic model"),
])
def test_missing_models_raise_clear_errors(name, match):
    with pytest.raises(modelutils.ModelError, match=match):
        modelutils.load_model(name)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(modelutils.ModelError, match="no config.json"):
        modelutils.load_model(str(tmp_path))
