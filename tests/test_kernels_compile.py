"""Every shipped kernel config compiles for sm_80 and sm_90 with no spills and with tensor-core instructions.

Runs without a GPU: Triton's bundled ptxas builds the cubins and its bundled cuobjdump reads them
(see ``routed_lora.kernels.aot``). ptxas puts register spills in the stack frame, so both STACK and LOCAL
must be 0. Tensor cores: HGMMA (wgmma) on sm_90, HMMA (mma.sync) on sm_80.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from routed_lora.kernels import aot, launch  # noqa: E402


@pytest.fixture(scope="module")
def report():
    if not os.path.exists(aot.cuobjdump_path()):
        pytest.skip("Triton's bundled cuobjdump is missing")
    return aot.compile_report(archs=(80, 90))


def test_every_shipped_config_is_covered(report):
    expected = (
        2 * len(launch.LINEAR_CONFIGS)  # fused forward, fused dx
        + 2 * len(launch.LINEAR_LORA_CONFIGS)  # cuBLAS variant: LoRA add for y and for dx
        + 2 * sum(len(v) for v in aot.SHRINK_SPLITS.values())  # tile families x splits x (x, A) / (g, B)
        + len(aot.GRAD_AB_SPLITS)
    )
    tma = 2 * len(launch.TMA_CONFIGS)  # forward and dx, sm_90 only
    assert len(report) == 2 * expected + tma
    assert {r["arch"] for r in report} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in report} == {"routed_linear_kernel", "routed_shrink_kernel", "routed_grad_ab_kernel",
                                             "routed_linear_tma_kernel"}
    for r in report:
        assert set(r) >= {"kernel", "config", "arch", "registers", "local_bytes", "stack_bytes", "shared_bytes",
                          "tensor_core_instructions", "tma_instructions"}


def test_no_spills_and_tensor_cores(report):
    bad = []
    for r in report:
        what = f"{r['kernel']}[{r['variant']}] {r['config']} {r['arch']}"
        if r["stack_bytes"] != 0 or r["local_bytes"] != 0:
            bad.append(f"{what}: spills (STACK {r['stack_bytes']}, LOCAL {r['local_bytes']}, {r['registers']} regs)")
        # wgmma needs >= 64 rows per warpgroup: a 16-row decode tile uses mma.sync (HMMA) on sm_90 too.
        small_tile = r["config"].get("BLOCK_M", 64) < 64
        if r["tensor_core_instructions"] == 0 and not (small_tile and r["any_mma_instructions"] > 0):
            bad.append(f"{what}: no {r['tensor_core_opcode']} in the SASS")
        if not 0 < r["registers"] <= 255:
            bad.append(f"{what}: {r['registers']} registers")
    assert not bad, "\n".join(bad)


def test_parse_resource_usage():
    text = "Function routed_linear_kernel:\nREG:122 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:580 TEXTURE:0"
    assert aot.parse_resource_usage(text) == {
        "registers": 122, "stack_bytes": 0, "static_shared_bytes": 1024, "local_bytes": 0
    }


def test_sm90_gemm_uses_tma(report):
    """Every sm_90 config of the GEMM that the fused path runs there (the TMA kernel, forward and dx) has TMA
    loads/stores in its SASS; the cp.async kernel (sm_80, and sm_90's fallback for operands TMA cannot
    describe) has none."""
    tma = [r for r in report if r["kernel"] == "routed_linear_tma_kernel"]
    assert len(tma) == 2 * len(launch.TMA_CONFIGS) and all(r["arch"] == "sm_90" for r in tma)
    assert all(r["tma_instructions"] > 0 for r in tma), [(r["variant"], r["config"]) for r in tma]
    assert {r["config"]["BLOCK_N"] for r in tma} >= {256}  # the 128 x 256 x 64 class
    plain = [r for r in report if r["kernel"] == "routed_linear_kernel"]
    assert all(r["tma_instructions"] == 0 for r in plain)
