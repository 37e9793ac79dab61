"""Adapter files: one PEFT LoRA folder per adapter plus a small routed-lora manifest.

Layout written by :func:`save_adapters`::

    path/
      routed_lora.json                  {"format": "routed-lora", "adapters": [...], "r", "lora_alpha",
                                         "use_rslora", "modules": [...], "router": {...} | null, ...}
      reasoning/adapter_config.json     a PEFT LoRA config (peft_type LORA, r, lora_alpha, target_modules, ...)
      reasoning/adapter_model.safetensors
                                        base_model.model.<module>.lora_A.weight (r, in)
                                        base_model.model.<module>.lora_B.weight (out, r)
      tool/...

so ``peft.PeftModel.from_pretrained(base_model, path / "tool")`` loads the tool adapter. :func:`load_adapters`
reads these folders and folders written by PEFT itself. PEFT itself only warns on a wrong key prefix and falls
back to defaults for a missing ``target_modules`` or ``lora_alpha`` (DESIGN.md §2); here every mismatch is an
error, raised before anything is copied, so a failed load leaves the model exactly as it was.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .fsdp import copy_row_into, full_tensor, is_sharded
from .hf import _state, routed_layers, target_matches
from .state import atomic_write_bytes as _atomic_write_bytes  # a module attribute: tests fail it on purpose

__all__ = ["save_adapters", "load_adapters", "adapter_payload", "MANIFEST", "FORMAT_VERSION"]

MANIFEST = "routed_lora.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1

# PEFT LoraConfig keys that do not change the weights' meaning at inference.
_BENIGN = {
    "peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "lora_dropout", "base_model_name_or_path",
    "revision", "task_type", "inference_mode", "init_lora_weights", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "kasa_config", "ensure_weight_tying",
    # how PEFT merges into a base weight stored (in, out) (Conv1D); A (r, in) and B (out, r) keep the
    # nn.Linear layout either way, and PEFT resets a flag that does not fit the module (with a warning)
    "fan_in_fan_out",
}
# Options this package does not implement: a non-default value is an error.
_UNSUPPORTED_DEFAULTS = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "velora_config": None,
}


def _empty(v) -> bool:
    return v is None or v is False or v == {} or v == [] or v == "none"


# ---------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------
def _peft_target_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The shortest PEFT ``target_modules`` list selecting exactly ``names`` in ``model``: the distinct last
    name components when they select nothing else, else the full module names."""
    wanted = set(names)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    hit = {n for n, _ in model.named_modules() if n and target_matches(short, n)}
    return short if hit == wanted else sorted(wanted)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _writes(model: nn.Module) -> bool:
    """False on the ranks other than 0 of an FSDP2-sharded model (rank 0 writes the gathered tensors)."""
    if not is_sharded(model):
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0


def _collective_under_fsdp(save):
    """Under FSDP2 every rank calls ``save`` and all leave it together (a barrier after rank 0 has written,
    also when it failed), so no rank reads a folder still being written."""

    @functools.wraps(save)
    def wrapper(model, *args, **kwargs):
        if not is_sharded(model):
            return save(model, *args, **kwargs)
        import torch.distributed as dist

        try:
            return save(model, *args, **kwargs)
        finally:
            dist.barrier()

    return wrapper


def adapter_payload(model: nn.Module, adapters: Sequence[str] | None = None) -> tuple[dict, dict, dict]:
    """The adapter set of ``model`` in memory, as :func:`save_adapters` writes it: ``(manifest, config,
    tensors)`` with the manifest of ``routed_lora.json``, the PEFT LoRA config (one for every adapter: they share
    rank, alpha and modules) and ``tensors[adapter]`` = ``{"base_model.model.<module>.lora_A.weight": (r, in),
    "...lora_B.weight": (out, r)}`` on the CPU. Also the weight sync to a vLLM engine
    (:mod:`routed_lora.integrations.verl_sync`) uses it, so files and sync have one naming.

    FSDP2 (``fully_shard``): a collective (every rank gathers the full tensors); call it on every rank."""
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no RoutedLoRALinear layers")
    first = layers[0][1]
    for n, layer in layers:
        if (layer.adapter_names, layer.r, layer.lora_alpha, layer.use_rslora) != (
            first.adapter_names, first.r, first.lora_alpha, first.use_rslora
        ):
            raise ValueError(f"layer {n!r} has another adapter configuration than {layers[0][0]!r}")
    all_names = first.adapter_names
    chosen = list(all_names) if adapters is None else list(adapters)
    unknown = [a for a in chosen if a not in all_names]
    if unknown or not chosen:
        raise ValueError(f"adapters: expected names among {all_names}, got {adapters!r}")
    module_names = [n for n, _ in layers]
    targets = _peft_target_modules(model, module_names)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    st = _state(model, required=False)
    router = None if st is None or st.router is None else _router_dict(st.router)
    # PEFT's flag for a base weight stored (in, out), transformers' Conv1D (GPT-2): what PEFT itself writes for
    # such a model. A/B keep the nn.Linear layout either way; PEFT corrects a wrong flag per module with a warning.
    conv = set(getattr(st, "originals", {}) or {}) if st is not None else set()
    fan_in_fan_out = bool(conv) and all(n in conv for n in module_names)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "use_rslora": first.use_rslora,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "base_model_name_or_path": base_name,
        "revision": None,
    }
    # FSDP2: the adapters are DTensor shards; every rank gathers the full tensors (a collective).
    full = {n: (full_tensor(layer.lora_A.detach()), full_tensor(layer.lora_B.detach())) for n, layer in layers}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in chosen:
        e = all_names.index(name)
        t = tensors[name] = {}
        for n, _ in layers:
            A, B = full[n]
            t[f"base_model.model.{n}.lora_A.weight"] = A[e].contiguous().cpu().clone()
            t[f"base_model.model.{n}.lora_B.weight"] = B[e].contiguous().cpu().clone()
    manifest = {
        "format": "routed-lora",
        "version": FORMAT_VERSION,
        "adapters": chosen,
        "model_adapters": list(all_names),
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "use_rslora": first.use_rslora,
        "target_modules": st.config["target_modules"] if st is not None else targets,
        "modules": module_names,
        "router": router,
        "base_model_class": type(model).__name__,
    }
    return manifest, config, tensors


@_collective_under_fsdp
def save_adapters(model: nn.Module, path: str | os.PathLike, *, adapters: Sequence[str] | None = None) -> Path:
    """Write every adapter (or those named in ``adapters``) of ``model`` as a PEFT LoRA folder under ``path``,
    plus ``routed_lora.json``. Returns ``Path(path)``.

    Atomic: the whole set is written to a temporary folder beside ``path`` (``NAME.tmp<pid>-hex``) and then
    swapped in by rename (:func:`routed_lora.state.swap_folder`; one atomic exchange on Linux), so a reader or a
    kill sees the old set or the new one, never a mix. Files of the old folder that are not part of the new set
    go with it.

    FSDP2 (``fully_shard``): call it on every rank; the full tensors are gathered, rank 0 alone writes.
    """
    from safetensors.torch import save as st_save

    if not routed_layers(model):
        raise ValueError(f"model: {type(model).__name__} has no RoutedLoRALinear layers")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"path: {path} exists and is not a folder")
    if path.is_dir():
        # the whole folder is replaced: refuse one that holds anything but an adapter set (its manifest and
        # adapter folders), so that no other file is deleted with the old set
        other = sorted(p.name for p in path.iterdir()
                       if not (p.name == MANIFEST or (p.is_dir() and (p / CONFIG).is_file())))
        if other:
            raise FileExistsError(f"path: {path} holds other files than an adapter set ({other[:5]}); the whole "
                                  "folder is replaced on save, so save into a new or an adapters-only folder")

    manifest, config, tensors = adapter_payload(model, adapters)  # a collective under FSDP2: every rank
    if not _writes(model):
        return path
    files: dict[str, bytes] = {}
    for name in manifest["adapters"]:
        files[f"{name}/{CONFIG}"] = _json_bytes(config)
        files[f"{name}/{WEIGHTS}"] = st_save(tensors[name], metadata={"format": "pt"})

    from .state import remove_stale_temporaries, swap_folder, tmp_name

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, names=(path.name,))  # what a killed earlier save left beside it
    tmp = tmp_name(path, "tmp", uuid.uuid4().hex[:8])
    tmp.mkdir()
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(tmp / rel, data)
        _atomic_write_bytes(tmp / MANIFEST, _json_bytes(manifest))
        swap_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _router_dict(router) -> dict | None:
    to_dict = getattr(router, "to_dict", None)
    return to_dict() if callable(to_dict) else {"type": type(router).__name__}


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
class AdapterLoadError(ValueError):
    """An adapter folder does not fit the model; nothing was loaded."""


def _read_json(p: Path) -> dict:
    try:
        with open(p) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise AdapterLoadError(f"{p}: missing") from None
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise AdapterLoadError(f"{p}: expected a JSON object")
    return obj


def _check_peft_config(cfg: dict, where: Path) -> None:
    ptype = cfg.get("peft_type")
    if not isinstance(ptype, str) or ptype.upper() != "LORA":
        raise AdapterLoadError(f"{where}: peft_type must be 'LORA', got {ptype!r}")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) in (None, "", []):
            raise AdapterLoadError(
                f"{where}: '{key}' is missing; PEFT would fall back to a default and give other logits, "
                "so it is required here"
            )
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if key in cfg and not _empty(cfg[key]) and cfg[key] != default:
            raise AdapterLoadError(
                f"{where}: PEFT option {key}={cfg[key]!r} is not supported by routed-lora (only plain LoRA, "
                "with or without rsLoRA)"
            )
    for key, value in cfg.items():
        if key not in _BENIGN and key not in _UNSUPPORTED_DEFAULTS and not _empty(value):
            raise AdapterLoadError(f"{where}: unknown PEFT option {key}={value!r}; refusing to guess its meaning")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterLoadError(f"{where}: r must be an integer >= 1, got {r!r}")
    a = cfg["lora_alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or a <= 0:
        raise AdapterLoadError(f"{where}: lora_alpha must be a positive number, got {a!r}")


def _sources(model_adapters, path, adapter) -> list[tuple[str, Path]]:
    if isinstance(path, Mapping):
        if adapter is not None:
            raise ValueError("adapter: not used when path is a mapping {adapter: folder}")
        pairs = [(str(k), Path(v)) for k, v in path.items()]
    else:
        path = Path(path)
        if (path / MANIFEST).is_file():
            manifest = _read_json(path / MANIFEST)
            if manifest.get("format") != "routed-lora":
                raise AdapterLoadError(f"{path / MANIFEST}: not a routed-lora manifest")
            if manifest.get("version") != FORMAT_VERSION:
                raise AdapterLoadError(f"{path / MANIFEST}: format version {manifest.get('version')!r} not supported")
            names = manifest.get("adapters")
            if not isinstance(names, list) or not names:
                raise AdapterLoadError(f"{path / MANIFEST}: 'adapters' must be a non-empty list")
            if adapter is not None:
                wanted = [adapter] if isinstance(adapter, str) else list(adapter)
                missing = [a for a in wanted if a not in names]
                if missing:
                    raise AdapterLoadError(f"{path}: holds adapters {names}, not {missing}")
                names = wanted
            pairs = [(n, path / n) for n in names]
        elif (path / CONFIG).is_file():
            if not isinstance(adapter, str):
                raise ValueError(
                    f"{path} is a single PEFT adapter folder: say which adapter it becomes with adapter='name' "
                    f"(one of {model_adapters})"
                )
            pairs = [(adapter, path)]
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such folder")
        else:
            raise AdapterLoadError(f"{path}: neither a routed-lora folder ({MANIFEST}) nor a PEFT folder ({CONFIG})")
    seen = set()
    for name, _ in pairs:
        if name not in model_adapters:
            raise AdapterLoadError(f"adapter {name!r} is not one of the model's adapters {model_adapters}")
        if name in seen:
            raise AdapterLoadError(f"adapter {name!r} given twice")
        seen.add(name)
    return pairs


def load_adapters(
    model: nn.Module,
    path: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    adapter: str | Sequence[str] | None = None,
    router=None,
) -> nn.Module:
    """Load adapters into ``model``; all or nothing. Returns ``model``.

    ``model`` is patched by :func:`~routed_lora.apply_routed_lora` already, or plain: then ``path`` must be a
    folder written by :func:`save_adapters`, and the model is patched from its ``routed_lora.json`` (same
    modules, rank, alpha, rsLoRA and adapter names; ``router`` is passed to ``apply_routed_lora``) before
    loading. If the load then fails the patch is undone.

    ``path`` is one of:

    - a folder written by :func:`save_adapters`: loads every adapter it lists (or those named in ``adapter``);
    - a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``), loaded into the adapter
      named by ``adapter``;
    - a mapping ``{adapter name: folder}`` of PEFT folders.

    Checks, before anything is copied: ``peft_type`` LORA with ``r``, ``lora_alpha`` and ``target_modules``
    present; no unsupported option (DoRA, rank_pattern, alpha_pattern, LoRA bias, modules_to_save, ...); the
    config's ``target_modules`` select exactly the model's routed layers under PEFT's rule; the file holds
    exactly the keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` of those layers with
    shapes (r, in) / (out, r) and the model's rank. A different scaling (``lora_alpha``, rsLoRA) is honoured by
    rescaling B to the model's scaling.
    """
    if routed_layers(model):
        if router is not None:
            raise ValueError("router: only used when load_adapters patches a plain model; the model is patched")
        _load_into(model, path, adapter)
        return model
    if not isinstance(path, Mapping) and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such folder")  # first, as for a patched model (_sources)
    if isinstance(path, Mapping) or not (Path(path) / MANIFEST).is_file():
        raise ValueError(
            f"model: {type(model).__name__} has no RoutedLoRALinear layers; call routed_lora.apply_routed_lora "
            f"first, or give a folder written by save_adapters (with {MANIFEST}) to patch it from"
        )
    from .hf import apply_routed_lora, remove_routed_lora

    manifest = _read_json(Path(path) / MANIFEST)
    try:
        kw = dict(
            target_modules=list(manifest["modules"]),
            r=int(manifest["r"]),
            lora_alpha=manifest["lora_alpha"],
            use_rslora=bool(manifest.get("use_rslora", False)),
            adapters=tuple(manifest.get("model_adapters") or manifest["adapters"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterLoadError(f"{Path(path) / MANIFEST}: incomplete manifest ({exc!r})") from None
    apply_routed_lora(model, router=router, **kw)
    try:
        _load_into(model, path, adapter)
    except BaseException:
        remove_routed_lora(model)
        raise
    return model


def _load_into(model, path, adapter) -> list[str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    layers = routed_layers(model)
    model_adapters = layers[0][1].adapter_names
    module_names = {n for n, _ in layers}
    all_modules = [n for n, _ in model.named_modules() if n]

    plan = []  # (adapter index, {layer name: (A, B)}) -- validated completely before any copy
    for name, folder in _sources(model_adapters, path, adapter):
        where = folder / CONFIG
        cfg = _read_json(where)
        _check_peft_config(cfg, where)
        weights = folder / WEIGHTS
        if not weights.is_file():
            other = " (only safetensors files are read; adapter_model.bin is not)" if (
                folder / "adapter_model.bin"
            ).exists() else ""
            raise AdapterLoadError(f"{weights}: missing{other}")
        targets = cfg["target_modules"]
        selected = {n for n in all_modules if target_matches(targets, n)}
        if selected != module_names:
            extra, missing = sorted(selected - module_names), sorted(module_names - selected)
            raise AdapterLoadError(
                f"{where}: target_modules={targets!r} selects other modules than the model's routed layers "
                f"(selected but not routed: {extra[:4]}; routed but not selected: {missing[:4]})"
            )
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise AdapterLoadError(f"{weights}: cannot read ({exc})") from None
        expected = {}
        for n in module_names:
            expected[f"base_model.model.{n}.lora_A.weight"] = (n, "A")
            expected[f"base_model.model.{n}.lora_B.weight"] = (n, "B")
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterLoadError(
                f"{weights}: keys do not match the model: missing {len(missing)} {missing[:3]}, "
                f"unexpected {len(unexpected)} {unexpected[:3]}"
            )
        r, alpha, rs = cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora", False))
        scale_file = alpha / (math.sqrt(r) if rs else r)
        per_layer = {}
        for n, layer in layers:
            if r != layer.r:
                raise AdapterLoadError(f"{where}: rank r={r} but the model's adapters have r={layer.r}")
            A = tensors[f"base_model.model.{n}.lora_A.weight"]
            B = tensors[f"base_model.model.{n}.lora_B.weight"]
            if tuple(A.shape) != (layer.r, layer.in_features):
                raise AdapterLoadError(
                    f"{weights}: {n}.lora_A has shape {tuple(A.shape)}, expected {(layer.r, layer.in_features)}"
                )
            if tuple(B.shape) != (layer.out_features, layer.r):
                raise AdapterLoadError(
                    f"{weights}: {n}.lora_B has shape {tuple(B.shape)}, expected {(layer.out_features, layer.r)}"
                )
            if not (A.is_floating_point() and B.is_floating_point()):
                raise AdapterLoadError(f"{weights}: {n} LoRA tensors must be floating point, got {A.dtype}/{B.dtype}")
            factor = scale_file / layer.scaling
            if factor != 1.0:
                B = (B.double() * factor).to(B.dtype)
            per_layer[n] = (A, B)
        plan.append((name, model_adapters.index(name), per_layer))

    by_name = dict(layers)
    with torch.no_grad():
        for _, e, per_layer in plan:
            for n, (A, B) in per_layer.items():
                layer = by_name[n]
                copy_row_into(layer.lora_A, e, A)  # plain or FSDP2-sharded (each rank its own rows)
                copy_row_into(layer.lora_B, e, B)
    return [name for name, _, _ in plan]
