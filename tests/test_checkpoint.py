"""Packed checkpoints: exact round trips of every compression mode, sizes from bytes, refusal of bad files."""
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

import checkpoint
import datautils
import modelutils
import quant
import sparsegpt
import vicuna_mi

SEQLEN = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A random 2-layer LLaMA (tied embeddings) with SmolLM2's tokenizer, saved like any hub model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(modelutils.convert_gguf(modelutils.smollm2_gguf_path()))
    except modelutils.ModelError as e:
        pytest.skip(str(e))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def calib(tiny_dir, data_dir) -> torch.Tensor:
    lm = modelutils.load_model(tiny_dir)
    return datautils.calibration_windows("c4", lm.tokenizer, 2, SEQLEN, 0, data_dir)


def compress_and_save(tiny_dir, calib, dest, dtype=None, **options):
    """Compress the tiny model in memory, writing a checkpoint as the CLI does; returns (lm, records)."""
    cfg = vicuna_mi.CompressConfig(tiny_dir, "c4", nsamples=2, seqlen=SEQLEN, device="cpu", **options)
    lm = modelutils.load_model(tiny_dir, dtype=dtype)
    writer = checkpoint.CheckpointWriter(dest, lm.model)
    records = vicuna_mi.compress_model(cfg, lm.model, calib, torch.device("cpu"),
                                       vicuna_mi.StageTimer(torch.device("cpu")), writer=writer)
    writer.finish(lm.model, lm.tokenizer, {"note": "test"}, lm.fold_vocab)
    return lm, records


def tensor_data_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its header; their sum is the file's data."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    assert sum(sizes.values()) == len(raw) - 8 - header_len
    return sizes


MODES = {
    "unstructured_mi": dict(sparsity=0.5, n_groups=4, target_avg_bits=3.5),
    "2:4_uniform4": dict(sparsity=0, prunen=2, prunem=4, use_mi_grouping=False, wbits=4),
    "quant_only": dict(sparsity=0, n_groups=4, target_avg_bits=3.0, grouping="contiguous"),
    "mixed_with_16": dict(sparsity=0.5, n_groups=4, bit_choices=(2, 4, 16), target_avg_bits=6.0, grouping="random"),
    "uniform3": dict(sparsity=0.5, use_mi_grouping=False, wbits=3),
    "magnitude": dict(sparsity=0.5, method="magnitude", use_mi_grouping=False, wbits=4),
    "prune_only_wanda": dict(sparsity=0.5, method="wanda", use_mi_grouping=False, wbits=16),
}
STORAGE = {"unstructured_mi": "bitmap", "2:4_uniform4": "nm", "quant_only": "dense", "uniform3": "bitmap",
           "magnitude": "bitmap", "prune_only_wanda": "bitmap"}


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_is_exact_and_sizes_come_from_the_bytes(tiny_dir, calib, tmp_path, mode):
    lm, records = compress_and_save(tiny_dir, calib, tmp_path / "ck", **MODES[mode])
    again = checkpoint.load_compressed(tmp_path / "ck")
    ours, theirs = lm.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, w in ours.items():
        assert w.dtype == theirs[name].dtype and torch.equal(w.view(torch.int32), theirs[name].view(torch.int32)), name
    with torch.no_grad():
        assert torch.equal(lm.model(calib).logits, again.model(calib).logits)
    if mode in STORAGE:
        assert {r["storage"] for r in records} == {STORAGE[mode]}
    # effective bits = 8 * bytes of the layer tensors in the files / weights, per layer and overall
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    total_bytes = total_weights = 0
    for layer in (0, 1):
        recs = [r for r in records if r["layer"] == layer]
        sizes = tensor_data_bytes(tmp_path / "ck" / checkpoint.LAYER_FILE.format(layer))
        for r in recs:
            name = f"model.layers.{layer}.{r['name']}"
            file_bytes = sum(v for k, v in sizes.items() if k.rpartition(".")[0] == name)
            assert file_bytes == r["packed_bytes"] == manifest["linears"][name]["bytes"]
            assert r["effective_bits"] == 8 * file_bytes / (r["shape"][0] * r["shape"][1])
        total_bytes += sum(sizes.values())
        total_weights += sum(r["shape"][0] * r["shape"][1] for r in recs)
    assert vicuna_mi._weighted(records, "effective_bits") == pytest.approx(8 * total_bytes / total_weights, rel=1e-12)


def test_fp16_model_round_trip_is_exact(tiny_dir, calib, tmp_path):
    """The GPU path keeps the model in fp16: the decoded fp32 products are cast exactly as the solver's were."""
    lm, _ = compress_and_save(tiny_dir, calib, tmp_path / "ck", dtype=torch.float16, sparsity=0.5, n_groups=4,
                              bit_choices=(3, 4, 16), target_avg_bits=5.0)
    again = checkpoint.load_compressed(tmp_path / "ck")
    for name, w in lm.model.state_dict().items():
        assert w.dtype == torch.float16 and torch.equal(w.view(torch.int16), again.model.state_dict()[name].view(torch.int16))
    as_fp32 = checkpoint.load_compressed(tmp_path / "ck", dtype=torch.float32)   # exact upcast
    assert torch.equal(as_fp32.model.model.layers[0].mlp.up_proj.weight, lm.model.model.layers[0].mlp.up_proj.weight.float())


def test_two_four_bytes_follow_the_format():
    """One 4-bit group per row, 2:4: 3-bit pattern per block of 4, two 4-bit codes per block, fp16 scale + u8 zero per row."""
    torch.manual_seed(0)
    rows, cols = 8, 32
    W = torch.randn(rows, cols)
    grid = quant.uniform_grid(W, 4)
    result = sparsegpt.sparsegpt_solve(W, torch.eye(cols) * 2, prune_n=2, prune_m=4, block_size=16, grid=grid)
    col_bits = torch.full((cols,), 4)
    W32, W_model = checkpoint.storable(result.weight, col_bits, torch.float32)
    packed = checkpoint.pack_linear("x", W32, W_model, result.mask, col_bits, torch.zeros(cols, dtype=torch.long),
                                    grid, 2, 4)
    blocks = rows * cols // 4
    assert packed.storage == "nm"
    assert packed.nbytes == 1 + cols + rows * 3 + math.ceil(blocks * 3 / 8) + math.ceil(blocks * 2 * 4 / 8)
    assert checkpoint.pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4]   # LSB first


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_matches_a_bit_by_bit_reference(bits):
    """Every width (word path and bit path), lengths around a run of values and across the chunk size."""
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 61, 1000):
        v = torch.randint(0, 2 ** bits, (n,), generator=g)
        stream = [(int(v[i // bits]) >> (i % bits)) & 1 for i in range(n * bits)]   # bit j of value i at i*bits + j
        stream += [0] * (-len(stream) % 8)
        expected = [sum(stream[8 * k + t] << t for t in range(8)) for k in range(len(stream) // 8)]
        assert checkpoint.pack_bits(v, bits).tolist() == expected
    n = checkpoint._CHUNK + 13
    v = torch.randint(0, 2 ** bits, (n,), generator=g)
    packed = checkpoint.pack_bits(v, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(checkpoint.unpack_bits(packed, bits, n), v.to(torch.int32))


def run_main(capsys, args):
    code = vicuna_mi.main(args)
    err = capsys.readouterr().err
    return code, [line for line in err.replace("\r", "\n").splitlines() if line.startswith("vicuna_mi")]


def test_cli_save_reload_and_dense_export(tiny_dir, data_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    common = ["c4", "--nsamples", "2", "--seqlen", str(SEQLEN), "--eval", "wikitext2", "--eval_samples", "2",
              "--data_dir", data_dir, "--device", "cpu"]
    packed, dense = tmp_path / "packed", tmp_path / "dense"
    code, errors = run_main(capsys, [tiny_dir] + common + ["--n_groups", "4", "--target_avg_bits", "3.5",
                                                           "--save", str(packed), "--save_dense", str(dense),
                                                           "--out", str(tmp_path / "r.json")])
    assert code == 0, errors
    report = json.loads((tmp_path / "r.json").read_text())
    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION and manifest["report"]["ppl"] == report["ppl"]
    assert report["size"]["tensor_bytes"] < sum(f.stat().st_size for f in packed.glob("*.safetensors"))
    assert {"actual", "kept", "effective", "effective_kept"} <= report["avg_bits"].keys()
    assert not list(tmp_path.glob(".*partial*"))
    # the checkpoint as MODEL: the same perplexity, bit for bit
    code, errors = run_main(capsys, [str(packed)] + common + ["--sparsity", "0", "--use_mi_grouping", "0",
                                                              "--wbits", "16", "--out", str(tmp_path / "r2.json")])
    assert code == 0, errors
    assert json.loads((tmp_path / "r2.json").read_text())["ppl"] == report["ppl"]
    # the dense export: a plain HF checkpoint holding the compressed weights in fp16
    plain = AutoModelForCausalLM.from_pretrained(dense)
    reference = checkpoint.load_compressed(packed, dtype=torch.float16).model
    for name, w in reference.state_dict().items():
        assert torch.equal(plain.state_dict()[name].half(), w), name
    code, errors = run_main(capsys, [str(dense)] + common + ["--sparsity", "0", "--use_mi_grouping", "0", "--wbits", "16",
                                                             "--eval_layerwise", "0", "--out", str(tmp_path / "r3.json")])
    assert code == 0, errors
    import eval_ppl
    ids = datautils.eval_tokens("wikitext2", plain_tokenizer(dense), SEQLEN, data_dir)
    expected, _ = eval_ppl.perplexity(reference.float(), ids, SEQLEN, "cpu", limit=2, layerwise=False)
    assert json.loads((tmp_path / "r3.json").read_text())["ppl"]["wikitext2"] == expected


def plain_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def saved(tiny_dir, calib, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("saved") / "ck"
    compress_and_save(tiny_dir, calib, dest, sparsity=0.5, use_mi_grouping=False, wbits=4)
    return dest


def _rehash(ck: Path, name: str) -> None:
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (ck / name).stat().st_size, "sha256": checkpoint._sha256(ck / name)}
    (ck / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(ck):
    path = ck / "layer_00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(ck):
    path = ck / "dense.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _drop_tensor(ck):
    from safetensors.torch import load_file, save_file
    path = ck / "layer_00001.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.zero"]
    save_file(tensors, path)
    _rehash(ck, path.name)


def _retype_tensor(ck):
    from safetensors.torch import load_file, save_file
    path = ck / "layer_00000.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.scale"] = tensors["model.layers.0.self_attn.q_proj.scale"].float()
    save_file(tensors, path)
    _rehash(ck, path.name)


def _version(ck):
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["format_version"] = 0
    (ck / "manifest.json").write_text(json.dumps(manifest))


def _unlisted(ck):
    (ck / "model.safetensors").write_bytes(b"x")


def _reshape_manifest(ck):
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["linears"]["model.layers.0.mlp.up_proj"]["shape"] = [64, 128]
    (ck / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("tamper, message", [
    (_flip_byte, "layer_00000.safetensors: sha256 does not match"),
    (_truncate, "dense.safetensors: "),
    (_drop_tensor, "missing tensor model.layers.1.mlp.down_proj.zero"),
    (_retype_tensor, "q_proj.scale: dtype float32, expected float16"),
    (_version, "format version 0 is not supported"),
    (_unlisted, "model.safetensors: file not listed in the manifest"),
    (_reshape_manifest, "up_proj has shape [64, 128] in the manifest"),
])
def test_tampered_checkpoint_is_refused_with_one_line(saved, tmp_path, capsys, tamper, message):
    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    tamper(ck)
    code, errors = run_main(capsys, [str(ck), "c4", "--sparsity", "0", "--use_mi_grouping", "0", "--wbits", "16",
                                     "--eval", "none"])
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_compressed(ck)


def test_bad_destinations_fail_before_any_work(saved, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(modelutils, "load_model", no_loading)
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    synthetic, model = ["synthetic:tiny", "c4", "--eval", "none"], [str(saved), "c4", "--eval", "none"]
    cases = [
        (synthetic + ["--save", str(tmp_path / "file")], "exists and is not a directory"),
        (synthetic + ["--save", str(tmp_path / "foreign")], "holds no previous packed checkpoint"),
        (model + ["--save_dense", str(tmp_path / "foreign")], "holds no previous dense export"),
        (model + ["--save_dense", str(saved)], "holds no previous dense export"),
        (synthetic + ["--save_dense", str(tmp_path / "d")], "synthetic model"),
        (model + ["--save", str(tmp_path / "a"), "--save_dense", str(tmp_path / "a" / "b")], "separate directories"),
        (synthetic + ["--save", str(tmp_path / "p"), "--sparsity", "0", "--use_mi_grouping", "0"],
         "nothing is pruned or quantized"),
        (model + ["--save", str(saved)], "would overwrite the model being compressed"),
    ]
    for args, message in cases:
        code, errors = run_main(capsys, args)
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, errors)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    checkpoint.check_destination(str(saved), "--save")   # a previous checkpoint may be replaced


def test_failed_run_leaves_no_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("disk full")

    monkeypatch.setattr(checkpoint.CheckpointWriter, "finish", fail)
    code, errors = run_main(capsys, ["synthetic:tiny", "c4", "--nsamples", "2", "--seqlen", str(SEQLEN), "--eval", "none",
                                     "--use_mi_grouping", "0", "--wbits", "4", "--data_dir", data_dir,
                                     "--save", str(tmp_path / "ck"), "--out", str(tmp_path / "r.json")])
    assert code == 2 and "disk full" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []



def test_reloaded_checkpoint_says_it_was_packed(tiny_dir, calib, tmp_path):
    compress_and_save(tiny_dir, calib, tmp_path / "ck", sparsity=0.5, n_groups=2)
    lm = modelutils.load_model(str(tmp_path / "ck"))
    assert lm.weights_format == checkpoint.PACKED and lm.checkpoint_dtype == "float32"


def test_unverified_packing_gives_the_same_tensors():
    torch.manual_seed(1)
    rows, cols = 16, 48
    W = torch.randn(rows, cols)
    labels = torch.arange(cols) % 3
    bits = [2, 4, 16]
    grid = quant.group_grid(W, labels, bits)
    result = sparsegpt.sparsegpt_solve(W, torch.eye(cols) * 2, sparsity=0.5, block_size=16, grid=grid)
    col_bits = torch.tensor(bits)[labels]
    W32, W_model = checkpoint.storable(result.weight, col_bits, torch.float16)
    args = ("x", W32, W_model, result.mask, col_bits, labels, grid)
    a, b = checkpoint.pack_linear(*args), checkpoint.pack_linear(*args, verify=False)
    assert (a.storage, a.nbytes) == (b.storage, b.nbytes) and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("save", [False, True])
def test_compression_decodes_the_first_layer_or_every_saved_layer(monkeypatch, tmp_path, data_dir, save):
    import vicuna_mi
    flags = []
    pack = checkpoint.pack_linear
    monkeypatch.setattr(checkpoint, "pack_linear",
                        lambda name, *a, verify=True, **k: (flags.append((name, verify)), pack(name, *a, verify=verify, **k))[1])
    args = ["synthetic:tiny", "c4", "--nsamples", "2", "--seqlen", "16", "--eval", "none", "--data_dir", data_dir,
            "--out", str(tmp_path / "r.json")] + (["--save", str(tmp_path / "ckpt")] if save else [])
    assert vicuna_mi.main(args) == 0
    assert len(flags) == 2 * 7
    assert [v for _, v in flags] == [True] * 7 + [save] * 7   # layer 0 always, the rest when saved
