"""A fresh clone keeps working next to Hugging Face's packages (issue 18).

- Our ``kernels/`` folder must never hide Hugging Face's ``kernels`` package for a Python started in the
  repository root (transformers >= 5.25 imports it from ``transformers.modeling_utils``).
- A hub kernel that replaced the forward of a module holding routed linears must not drop the LoRA term.
- Our own loaders load with kernels off.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import warnings
from pathlib import Path
from types import MethodType

import pytest
import torch
import torch.nn.functional as F

import routed_lora as rl
from routed_lora.hf import routed_layers
from routed_lora.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run_in(cwd: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed")
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_hf_kernels_not_shadowed(where, tmp_path):
    """From the repository root ('' first on sys.path) and from elsewhere: transformers imports, the name
    ``kernels`` is Hugging Face's, and our kernels import as ``routed_lora.kernels``."""
    code = (
        "import transformers.modeling_utils, kernels, routed_lora.kernels.launch as launch\n"
        "from kernels import CUDAProperties\n"
        "print(kernels.__file__)\n"
        "print(launch.__name__, launch.__file__)\n"
    )
    proc = _run_in(ROOT if where == "root" else tmp_path, code)
    assert proc.returncode == 0, f"import failed in {where}:\n{proc.stderr[-3000:]}"
    hf_file, ours = proc.stdout.strip().splitlines()[-2:]
    assert not Path(hf_file).resolve().is_relative_to(ROOT / "kernels"), f"'kernels' is our folder: {hf_file}"
    assert ours.startswith("routed_lora.kernels.launch ")


def test_kernels_folder_is_not_a_regular_package():
    """The guard behind the test above, which is skipped where Hugging Face's kernels is missing."""
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow HF's kernels"
    pytest.importorskip("triton")
    import routed_lora.kernels.launch as launch

    assert launch.__name__ == "routed_lora.kernels.launch"


# --- hub kernels (kernelize) ------------------------------------------------------------------------------------


def _kernel_forward(self, x):
    """A stand-in hub kernel for the MLP that computes through the linears' weights instead of calling them
    (what a fused MLP kernel does): it would silently drop the routed LoRA term."""
    gate = F.linear(x, self.gate_proj.weight)
    up = F.linear(x, self.up_proj.weight)
    return F.linear(F.silu(gate) * up, self.down_proj.weight)


def _kernelize_mlps(model) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("MLP"):
            module.forward = MethodType(_kernel_forward, module)
            module._kernel_repo = "stand-in/fused-mlp"
            names.append(name)
    return names


def _nonzero_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in routed_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


def _logits(model, ids, route):
    with torch.no_grad():
        return model(input_ids=ids, routes=torch.full(ids.shape, route)).logits


def test_kernelized_owner_is_restored_and_lora_term_kept():
    ref = tiny_model(seed=3)
    torch.manual_seed(0)  # same lora_A init in both models
    rl.apply_routed_lora(ref, r=4)
    _nonzero_adapters(ref)

    model = tiny_model(seed=3)
    kernelized = _kernelize_mlps(model)
    assert kernelized
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"hub kernels had replaced the forward of .*mlp"):
        rl.apply_routed_lora(model, r=4)
    _nonzero_adapters(model)
    for name in kernelized:
        mlp = model.get_submodule(name)
        assert "forward" not in mlp.__dict__ and "_kernel_repo" not in mlp.__dict__
    # the routed model must equal the never-kernelized one, and the LoRA term must be there
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    got, want = _logits(model, ids, 0), _logits(ref, ids, 0)
    assert torch.equal(got, want), f"max |diff| {float((got - want).abs().max())}"
    assert not torch.allclose(got, _logits(model, ids, -1)), "the LoRA term vanished"


def test_kernelized_without_routed_layers_is_left_alone():
    """A kernel on a module holding no routed linear (here: every MLP, with attention-only targets) stays."""
    model = tiny_model(seed=3)
    kernelized = _kernelize_mlps(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.apply_routed_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    assert all(model.get_submodule(n).__dict__.get("_kernel_repo") for n in kernelized)


def test_rekernelization_on_mode_change_is_undone_before_the_call():
    """transformers re-kernelizes when its kernels mode changes (``model.train()``): the next call restores."""
    model = tiny_model(seed=3)
    rl.apply_routed_lora(model, r=4)
    _nonzero_adapters(model)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids, 1)
    _kernelize_mlps(model)  # what a re-kernelization in another mode does ...
    model._kernels_mode = "TRAINING"  # ... and the mode transformers records with it
    with pytest.warns(UserWarning, match="hub kernels"):
        got = _logits(model, ids, 1)
    assert torch.equal(got, want)


def test_kernelized_owners_lists_the_dangerous_modules():
    from routed_lora.hub_kernels import kernelized_owners

    model = tiny_model(seed=3)
    rl.apply_routed_lora(model, r=4)
    assert kernelized_owners(model) == []
    names = _kernelize_mlps(model)
    assert kernelized_owners(model) == names


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed")
def test_our_loaders_load_with_kernels_off(tmp_path):
    """transformers >= 5.25 kernelizes on load by default; our loaders (world, sft, train, eval, study, demo all
    go through these two) ask for no kernels."""
    from transformers import AutoModelForCausalLM

    from routed_lora.env.tokenizer import load_model
    from routed_lora.grpo import trainer
    from routed_lora.testing import tiny_tokenizer

    tiny_model().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    default = AutoModelForCausalLM.from_pretrained(tmp_path)
    if not getattr(default, "use_kernels", False):
        pytest.skip("this transformers does not kernelize on load by default")
    model, _ = load_model(tmp_path)
    assert model.use_kernels is False
    model, _ = trainer.load_model_and_tokenizer(tmp_path)
    assert model.use_kernels is False
