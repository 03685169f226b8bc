"""Model loading: built-in SmolLM2 (and the same file given as a .gguf path), synthetic shapes, clear errors."""
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


def test_builtin_and_gguf_path_give_the_same_model(smollm2):
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.model.config.num_hidden_layers == 30 and smollm2.model.config.hidden_size == 576
    again = modelutils.load_model(str(modelutils.smollm2_gguf_path()))
    for (k, a), (_, b) in zip(smollm2.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
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
