"""Loading the models people have: .bin shards (verified weights-only), safetensors, GQA, bf16, large vocabularies.

Tiny random LLaMA models (SmolLM2's 49,152-token vocabulary and tokenizer) are saved in each layout
and compressed through the CLI; layer-by-layer perplexity must equal the whole model's, and the
chunked loss must equal the unchunked one.
"""
import json
import os
import pathlib
import shutil
from fnmatch import fnmatch

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import eval_ppl
import modelutils
import vicuna_mi

VOCAB = 49152


def tiny_llama(kv_heads: int = 4, vocab: int = VOCAB, heads: int = 4, dtype: torch.dtype = torch.float32,
               ) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         use_cache=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def save_bin(model: LlamaForCausalLM, path: pathlib.Path, shards: int = 1, payload: object = None) -> None:
    """A PyTorch-format checkpoint as Vicuna publishes it: config.json, pytorch_model.bin, or shards
    pytorch_model-0000N-of-0000M.bin and pytorch_model.bin.index.json. transformers 5 writes only
    safetensors, so the files are written here with torch.save. ``payload`` goes into the last file.
    """
    model.config.save_pretrained(path)
    state = dict(model.state_dict())
    # Checkpoints saved by transformers 4.31 (Vicuna-13B-v1.5's) still hold the rotary buffers.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = model.model.rotary_emb.inv_freq.clone()
    keys = list(state)
    if shards == 1:
        parts = {"pytorch_model.bin": keys}
    else:
        size = -(-len(keys) // shards)
        parts = {f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin": keys[i * size:(i + 1) * size] for i in range(shards)}
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, ks in parts.items() for k in ks}}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for i, (name, ks) in enumerate(parts.items()):
        part = {k: state[k].clone() for k in ks}
        if payload is not None and i == len(parts) - 1:
            part["extra"] = payload
        torch.save(part, path / name)


def model_dir(tmp_path, smollm2, layout: str, model: LlamaForCausalLM) -> pathlib.Path:
    path = tmp_path / layout
    if layout.startswith("bin"):
        save_bin(model, path, shards=3 if layout == "bin_sharded" else 1)
    else:
        model.save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


class Touch:
    """Unpickling this calls Path.touch(marker): a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class System:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.command,)


LAYOUTS = {   # name -> (model, extra CLI options, weights_format, forward dtype)
    "bin_sharded": (lambda: tiny_llama(), [], modelutils.PYTORCH_BIN, "float32"),
    "bin_single": (lambda: tiny_llama(), [], modelutils.PYTORCH_BIN, "float32"),
    "safetensors": (lambda: tiny_llama(), [], modelutils.SAFETENSORS, "float32"),
    "gqa": (lambda: tiny_llama(kv_heads=2), [], modelutils.SAFETENSORS, "float32"),   # 4 heads, 2 KV heads
    "bf16": (lambda: tiny_llama(dtype=torch.bfloat16), ["--dtype", "bfloat16"], modelutils.SAFETENSORS, "bfloat16"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_compresses_and_evaluates_each_layout(tmp_path, data_dir, smollm2, monkeypatch, layout):
    make, extra, weights_format, dtype = LAYOUTS[layout]
    model = make()
    kv_heads = model.config.num_key_value_heads
    path = model_dir(tmp_path, smollm2, layout, model)
    # Evaluate the compressed model both ways in one run: wrap perplexity to also run the whole model.
    both = []
    real = eval_ppl.perplexity

    def perplexity(model, *args, layerwise=True, **kwargs):
        result = real(model, *args, layerwise=layerwise, **kwargs)
        both.append((result[0], real(model, *args, layerwise=not layerwise, **kwargs)[0],
                     next(model.parameters()).dtype))
        return result

    monkeypatch.setattr(eval_ppl, "perplexity", perplexity)
    out = tmp_path / "r.json"
    rc = vicuna_mi.main([str(path), "c4", "--data_dir", data_dir, "--nsamples", "2", "--seqlen", "32",
                         "--n_groups", "2", "--eval", "wikitext2", "--eval_samples", "2", "--device", "cpu",
                         "--out", str(out)] + extra)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"] == {"weights_format": weights_format, "checkpoint_dtype": dtype, "dtype": dtype}
    assert report["config"]["dtype"] == ("bfloat16" if extra else "auto")
    assert report["sparsity"]["mask"] == pytest.approx(0.5) and 0.5 <= report["sparsity"]["actual"] < 0.6
    assert abs(report["avg_bits"]["actual"] - 4.0) <= 0.01
    for rec in report["layers"]:   # q, k and v each pruned to exactly 50% in their one fused solve
        assert rec["mask_sparsity"] == pytest.approx(0.5, abs=1e-9)
    shapes = {r["name"]: r["shape"] for r in report["layers"] if r["layer"] == 0}
    assert shapes["self_attn.q_proj"] == [64, 64] and shapes["self_attn.k_proj"] == shapes["self_attn.v_proj"] == [16 * kv_heads, 64]
    layerwise, full, forward_dtype = both[0]
    assert str(forward_dtype) == f"torch.{dtype}"
    assert layerwise == report["ppl"]["wikitext2"] and 1 < layerwise < 1e6
    # Equal on this CPU in both dtypes; bf16 leaves room for kernels that round differently by batch shape.
    assert abs(layerwise - full) / full < (1e-3 if dtype == "bfloat16" else 1e-5)


@pytest.mark.parametrize("shards, payload", [(1, System), (3, Touch)])
def test_malicious_bin_is_refused_and_never_run(tmp_path, capsys, shards, payload):
    path = tmp_path / "evil"
    marker = tmp_path / "pwned"
    save_bin(tiny_llama(vocab=256), path, shards=shards, payload=payload(marker))   # the last shard carries it
    rc = vicuna_mi.main([str(path), "c4", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
                         "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    name = "pytorch_model.bin" if shards == 1 else "pytorch_model-00003-of-00003.bin"
    assert lines[0].startswith(f"vicuna_mi: error: refusing {path / name}: it needs more than tensors")
    assert "nothing in it was run" in lines[0]
    assert not (tmp_path / "r.json").exists()


def test_bin_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(modelutils.ModelError, match="not a state dict of named tensors"):
        modelutils.verify_pytorch_bin([tmp_path / "pytorch_model.bin"])


def test_index_naming_a_file_outside_the_directory_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../x.bin"}}))
    with pytest.raises(modelutils.ModelError, match="outside its directory"):
        modelutils.weight_files(tmp_path)


def test_directory_without_weights_is_refused(tmp_path):
    tiny_llama(vocab=256).config.save_pretrained(tmp_path)
    with pytest.raises(modelutils.ModelError, match="no weights in .*pytorch_model.bin.index.json"):
        modelutils.load_model(str(tmp_path))


def fake_hub(remote: pathlib.Path, cache: pathlib.Path, calls: list):
    """A stand-in for huggingface_hub.snapshot_download over a local "repository" (no network here)."""

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        snap = cache / "snapshots" / "0123abcd"   # one commit
        snap.mkdir(parents=True, exist_ok=True)
        for f in remote.iterdir():
            if any(fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snap / f.name)
        return str(snap)

    return snapshot_download


@pytest.mark.parametrize("with_safetensors", [False, True])
def test_hub_id_reads_safetensors_first_then_bin(tmp_path, smollm2, monkeypatch, with_safetensors):
    import huggingface_hub

    remote = tmp_path / "remote"
    model = tiny_llama(vocab=256)
    save_bin(model, remote, shards=3)
    if with_safetensors:
        model.save_pretrained(remote)
    smollm2.tokenizer.save_pretrained(remote)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(remote, tmp_path / "cache", calls))
    lm = modelutils.load_model("lmsys/tiny-bin", revision="main")
    snap = tmp_path / "cache" / "snapshots" / "0123abcd"
    assert lm.weights_format == (modelutils.SAFETENSORS if with_safetensors else modelutils.PYTORCH_BIN)
    assert calls[0][:2] == ("lmsys/tiny-bin", "main")
    if with_safetensors:   # the .bin files are never downloaded
        assert len(calls) == 1 and not list(snap.glob("*.bin"))
    else:                  # the fallback reads the same commit
        assert len(calls) == 2 and calls[1][1] == "0123abcd" and len(list(snap.glob("*.bin"))) == 3
    for name, p in model.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[name], p, rtol=0, atol=0)


def test_auto_dtype_follows_the_checkpoint_on_cuda_and_float32_on_cpu():
    auto = modelutils._default_dtype
    assert auto("cuda", None, torch.bfloat16) == torch.bfloat16
    assert auto("cuda:1", "auto", torch.float16) == torch.float16
    assert auto("cuda", None, torch.float32) == torch.float16 == auto("cuda", None, None)
    assert auto("cpu", None, torch.bfloat16) == torch.float32
    assert auto("cuda", "float32", torch.bfloat16) == torch.float32 == auto("cpu", torch.float32)
    with pytest.raises(modelutils.ModelError, match="unknown dtype 'half'"):
        auto("cpu", "half")


def test_bf16_checkpoint_loads_as_float32_on_cpu_unless_asked(tmp_path, smollm2):
    tiny_llama(vocab=256, dtype=torch.bfloat16).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    auto, bf16 = modelutils.load_model(str(tmp_path)), modelutils.load_model(str(tmp_path), dtype="bfloat16")
    cuda = modelutils.load_model(str(tmp_path), device="cuda")   # auto for a CUDA run; the model stays on the CPU
    assert auto.checkpoint_dtype == bf16.checkpoint_dtype == "bfloat16"
    assert next(auto.model.parameters()).dtype == torch.float32
    assert next(bf16.model.parameters()).dtype == next(cuda.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_fused_qkv_compresses_for_every_kv_head_count(kv_heads):
    model = tiny_llama(kv_heads=kv_heads, vocab=512, heads=4)
    cfg = vicuna_mi.CompressConfig("tiny", "c4", nsamples=4, seqlen=16, n_groups=2, device="cpu")
    calib = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    records = vicuna_mi.compress_model(cfg, model, calib, torch.device("cpu"), vicuna_mi.StageTimer(torch.device("cpu")))
    rows = {r["name"]: r["shape"][0] for r in records if r["layer"] == 0}
    assert rows["self_attn.q_proj"] == 64 and rows["self_attn.k_proj"] == rows["self_attn.v_proj"] == 16 * kv_heads
    for r in records:
        assert r["mask_sparsity"] == pytest.approx(0.5, abs=1e-9)
        assert abs(r["bits"] - 4.0) <= 0.01
    stream = torch.randint(0, 512, (1, 4 * 16), generator=torch.Generator().manual_seed(1))
    layerwise, _ = eval_ppl.perplexity(model, stream, 16, "cpu", batch_size=3)
    full, _ = eval_ppl.perplexity(model, stream, 16, "cpu", layerwise=False, batch_size=3)
    assert abs(layerwise - full) / full < 1e-5


@pytest.mark.parametrize("layerwise", [True, False])
def test_chunked_loss_equals_unchunked(layerwise):
    model = tiny_llama(vocab=VOCAB)
    seqlen, n = 24, 5
    stream = torch.randint(0, VOCAB, (1, n * seqlen), generator=torch.Generator().manual_seed(2))
    positions = {}   # chunk_tokens -> positions of every LM-head call
    ppl = {}
    for c in (5, 23, 40, 10 ** 6):
        positions[c] = []
        handle = model.lm_head.register_forward_hook(lambda m, a, out, c=c: positions[c].append(out[..., 0].numel()))
        try:
            ppl[c], _ = eval_ppl.perplexity(model, stream, seqlen, "cpu", layerwise=layerwise, batch_size=4,
                                            chunk_tokens=c)
        finally:
            handle.remove()
    # Reference: transformers' own loss, the mean NLL over each window's full logits.
    windows = stream.reshape(n, seqlen)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None], use_cache=False).loss.double() for w in windows]
    reference = torch.exp(torch.stack(losses).mean()).item()
    for c, value in ppl.items():
        assert abs(value - ppl[10 ** 6]) / ppl[10 ** 6] < 1e-6, c
        assert abs(value - reference) / reference < 1e-6, c
    # Chunks of 5: the head saw at most 5 positions at once (it used to see 4 windows x 23), besides the
    # walker's capture check (one window's logits) and the whole model's last position of each window.
    assert max(positions[5]) == (seqlen if layerwise else 5)
    assert max(positions[10 ** 6]) == 5 * 23 if layerwise else 4 * 23   # unchunked: the whole batch


def test_whole_model_with_a_scaled_head_is_refused():
    model = tiny_llama(vocab=256)
    real = model.forward

    def scaled(*args, **kwargs):   # a family that scales its logits (Cohere, Granite) without saying so
        out = real(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = scaled
    stream = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="LM head applies more than lm_head and logit soft-capping"):
        eval_ppl.perplexity(model, stream, 16, "cpu", layerwise=False)


def test_synthetic_llama3_8b_has_the_real_shapes_on_meta():
    config = modelutils.synthetic_config("llama3-8b")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    attn = model.model.layers[31].self_attn
    assert len(model.model.layers) == 32
    assert attn.q_proj.weight.shape == (4096, 4096) and attn.k_proj.weight.shape == attn.v_proj.weight.shape == (1024, 4096)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (14336, 4096)
    assert model.lm_head.weight.shape == (128256, 4096)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_legacy_torch_dtype_key_is_the_checkpoint_dtype(tmp_path, smollm2):
    # Vicuna-13B-v1.5's config.json says "torch_dtype": "float16" (transformers 4.x); on CUDA that is the dtype used.
    model = tiny_llama(vocab=256)
    save_bin(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    smollm2.tokenizer.save_pretrained(tmp_path)
    cpu, cuda = modelutils.load_model(str(tmp_path)), modelutils.load_model(str(tmp_path), device="cuda")
    assert cpu.checkpoint_dtype == cuda.checkpoint_dtype == "float16" and cpu.weights_format == modelutils.PYTORCH_BIN
    assert next(cpu.model.parameters()).dtype == torch.float32   # auto: float32 on the CPU,
    assert next(cuda.model.parameters()).dtype == torch.float16  # the checkpoint's own on CUDA (loaded on the CPU)
