"""Ahead-of-time compilation of every shipped kernel config, and a resource report from cuobjdump.

Runs without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` builds the cubin with
the ptxas bundled in Triton, and ``cuobjdump`` (also bundled, triton/backends/nvidia/bin) gives registers,
stack and local memory (ptxas puts register spills in the stack frame, so STACK 0 and LOCAL 0 mean no spills)
and the SASS, where tensor-core instructions are HGMMA (sm_90 wgmma) or HMMA (sm_80 mma.sync).

``compile_report(archs=(80, 90))`` returns one record per (kernel, config, arch) with the keys kernel, config,
arch, registers, local_bytes, stack_bytes, shared_bytes, tensor_core_instructions, tma_instructions (UTMALDG /
UTMASTG in the SASS: TMA loads and stores) (and num_warps, num_stages, variant, dtype, tensor_core_opcode).
The TMA GEMM is compiled for sm_90 only. ``compiled_kernels`` lists what is compiled: each kernel
variant (constexpr flags) with each config shipped for it, at the benchmark shape's E*r = 32 in bf16.
``routed-lora bench compile-report --json`` prints these records.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs, fused_lora, plan

__all__ = ["compiled_kernels", "compile_one", "compile_report", "cuobjdump_path", "parse_resource_usage"]

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Split counts compiled for the memory-bound kernels (1: no split; the others as the plans pick them at the
# benchmark shape and at decode sizes).
SHRINK_SPLITS = {"": (1, 3), "_small_m": (1, 8)}
GRAD_AB_SPLITS = (1, 3)


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _jit(fn):
    """The JITFunction of a kernel, also when the module was imported under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _signature(fn, dtype: str, pointer_types: dict, ints: tuple, floats: tuple, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name in ints or name.startswith("stride_") or name.isupper():
            sig[name] = "i32"
        else:
            raise KeyError(f"aot: no type for argument {name!r} of {fn.__name__}")
    return sig


LAYER_K = LAYER_N = 4096  # the benchmark shape; K, N, E are constexprs of the kernels


def _constexpr_names(fn) -> set:
    return {p.name for p in fn.params if p.is_constexpr}


def _divisibility(fn, names) -> dict:
    """``tt.divisibility`` 16 hints, as the launcher gives for aligned pointers and sizes / leading strides."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n in fn.arg_names}


def compiled_kernels(dtype: str = "bf16", R: int = 16, E: int = 2):
    """(kernel name, variant name, jit fn, signature, constexprs, attrs, config) for every shipped config.

    Like a JIT launch, integer arguments equal to 1 (the unit strides of contiguous tensors) are compiled as
    constants, and pointers, sizes and leading strides get divisibility-by-16 hints: without them the loads
    are not vectorised and the loops are not software-pipelined. The forward and the dx launch of the linear
    kernel have different unit strides, so both are compiled.
    """
    p = _PTR[dtype]
    block_r = plan._block_r(E * R)
    prec = "ieee"
    out = []

    def add(name, variant, fn, ptrs, unit, hints, flags, cfgs):
        fn = _jit(fn)
        for cfg in cfgs:
            ce = {**cfg.kwargs, **flags, "R": R, "DOT_PRECISION": prec, **{u: 1 for u in unit}}
            if "BLOCK_R" in fn.arg_names:
                ce["BLOCK_R"] = block_r
            # Per-layer sizes are constexprs (one compilation per layer shape): the benchmark shape's.
            for size, value in (("K", LAYER_K), ("N", LAYER_N), ("E", E), ("TILES_A", LAYER_K // configs.GRAD_AB_TILES["BLOCK_K"])):
                if size in fn.arg_names and size in _constexpr_names(fn):
                    ce[size] = value
            sig = _signature(fn, dtype, ptrs, (), ("scaling",), ce)
            out.append((name, variant, fn, sig, ce, _divisibility(fn, [h for h in hints if h not in ce]), cfg))

    ptrs = {"a_ptr": p, "w_ptr": p, "bias_ptr": p, "l_ptr": p, "u_ptr": p, "out_ptr": p}
    common = ["a_ptr", "w_ptr", "bias_ptr", "l_ptr", "u_ptr", "out_ptr", "M", "N", "K", "stride_am",
              "stride_lm", "stride_ue", "stride_om"]
    fwd_unit = ("stride_ak", "stride_wk", "stride_lc", "stride_ur", "stride_on")
    dx_unit = ("stride_ak", "stride_wn", "stride_lc", "stride_un", "stride_on")
    fused = {"BACKBONE": True, "HAS_BIAS": True}
    lora_only = {"BACKBONE": False, "HAS_BIAS": True}
    fn = fused_lora.routed_linear_kernel
    add("routed_linear_kernel", "fused_forward", fn, ptrs, fwd_unit, common + ["stride_wn", "stride_un"], fused,
        configs.LINEAR_CONFIGS)
    add("routed_linear_kernel", "fused_dx", fn, ptrs, dx_unit, common + ["stride_wk", "stride_ur"],
        {**fused, "HAS_BIAS": False}, configs.LINEAR_CONFIGS)
    add("routed_linear_kernel", "lora_only_forward", fn, ptrs, fwd_unit, common + ["stride_wn", "stride_un"],
        lora_only, configs.LINEAR_LORA_CONFIGS)
    add("routed_linear_kernel", "lora_only_dx", fn, ptrs, dx_unit, common + ["stride_wk", "stride_ur"],
        {**lora_only, "HAS_BIAS": False}, configs.LINEAR_LORA_CONFIGS)

    # sm_90 only: the TMA GEMM (forward: W read as (N, K) tiles and transposed; dx: W as stored).
    fn = fused_lora.routed_linear_tma_kernel
    ptrs = {"a_ptr": p, "w_ptr": p, "bias_ptr": p, "l_ptr": p, "u_ptr": p, "out_ptr": p}
    common = ["a_ptr", "w_ptr", "bias_ptr", "l_ptr", "u_ptr", "out_ptr", "M", "N", "K", "stride_am", "stride_wr",
              "stride_lm", "stride_ue", "stride_om"]
    add("routed_linear_tma_kernel", "tma_forward", fn, ptrs, ("stride_lc", "stride_ur"), common + ["stride_un"],
        {"TRANS_W": True, "HAS_BIAS": True}, configs.TMA_CONFIGS)
    add("routed_linear_tma_kernel", "tma_dx", fn, ptrs, ("stride_lc", "stride_un"), common + ["stride_ur"],
        {"TRANS_W": False, "HAS_BIAS": False}, configs.TMA_CONFIGS)

    # The memory-bound kernels: each plan tile family, with and without a split reduction (SPLITS is a
    # constexpr: its in-kernel fixed-order sum is unrolled), for the forward (x, A) and backward (g, B) strides.
    fn = fused_lora.routed_shrink_kernel
    ptrs = {"x_ptr": p, "l_ptr": p, "routes_ptr": "*i32", "out_ptr": p, "part_ptr": "*fp32", "lock_ptr": "*i32"}
    common = ["x_ptr", "l_ptr", "routes_ptr", "out_ptr", "part_ptr", "lock_ptr", "K", "K_PER_SPLIT", "stride_xm",
              "stride_le", "stride_om"]
    for fam_name, fam in (("", configs.SHRINK_TILES), ("_small_m", configs.SHRINK_TILES_SMALL_M)):
        cfg = triton.Config({"BLOCK_M": fam["BLOCK_M"], "BLOCK_K": fam["BLOCK_K"]}, num_warps=fam["num_warps"],
                            num_stages=fam["num_stages"])
        for splits in SHRINK_SPLITS[fam_name]:
            tag = f"shrink{fam_name}" + ("" if splits == 1 else f"_split{splits}")
            add("routed_shrink_kernel", tag + "_x", fn, ptrs, ("stride_xk", "stride_lk", "stride_oc"),
                common + ["stride_lr"], {"SPLITS": splits}, [cfg])
            add("routed_shrink_kernel", tag + "_g", fn, ptrs, ("stride_xk", "stride_lr", "stride_oc"),
                common + ["stride_lk"], {"SPLITS": splits}, [cfg])

    fn = fused_lora.routed_grad_ab_kernel
    ptrs = {"x_ptr": p, "g_ptr": p, "gp_ptr": p, "h_ptr": p, "routes_ptr": "*i32", "da_ptr": p, "db_ptr": p,
            "part_ptr": "*fp32", "lock_ptr": "*i32"}
    common = ["x_ptr", "g_ptr", "gp_ptr", "h_ptr", "routes_ptr", "da_ptr", "db_ptr", "part_ptr", "lock_ptr", "K",
              "N", "M_PER_SPLIT", "stride_xm", "stride_gm", "stride_gpm", "stride_hm", "stride_dae", "stride_dar",
              "stride_dbe", "stride_dbn"]
    unit = ("stride_xk", "stride_gn", "stride_gpc", "stride_hc", "stride_dak", "stride_dbr")
    fam = configs.GRAD_AB_TILES
    cfg = triton.Config({"BLOCK_M": fam["BLOCK_M"], "BLOCK_K": fam["BLOCK_K"]}, num_warps=fam["num_warps"],
                        num_stages=fam["num_stages"])
    rp = max(16, triton.next_power_of_2(R))
    apt = 2 if (E >= 2 and 2 * rp <= configs.MAX_BLOCK_R) else 1
    for splits in GRAD_AB_SPLITS:
        add("routed_grad_ab_kernel", "grad_ab" + ("" if splits == 1 else f"_split{splits}"), fn, ptrs, unit,
            common, {"SPLITS": splits, "RP": rp, "APT": apt}, [cfg])
    return out


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict:
    """Registers, stack, shared and local bytes from ``cuobjdump --dump-resource-usage`` output."""
    m = _RES_RE.search(text)
    if not m:
        raise ValueError(f"cuobjdump: no resource line in output:\n{text[:2000]}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def compile_one(fn, signature: dict, constexprs: dict, attrs: dict, num_warps: int, num_stages: int, arch: int):
    """Compile one kernel config for ``sm_<arch>``; returns (compiled kernel, resource dict, SASS text)."""
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = compiled.asm["cubin"]
    tool = cuobjdump_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    return compiled, parse_resource_usage(res.stdout), sass


def _record(item, arch: int, dtype: str) -> dict:
    name, variant, fn, sig, ce, attrs, cfg = item
    compiled, res, sass = compile_one(fn, sig, ce, attrs, cfg.num_warps, cfg.num_stages, arch)
    opcode = "HGMMA" if arch >= 90 else "HMMA"
    n_tc = len(re.findall(rf"\b{opcode}\b", sass))
    n_any_tc = len(re.findall(r"\bH[G]?MMA\b", sass))
    n_tma = len(re.findall(r"\bUTMA(?:LDG|STG)\b", sass))
    return {
        "kernel": name,
        "variant": variant,
        "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        "arch": f"sm_{arch}",
        "dtype": dtype,
        "registers": res["registers"],
        "local_bytes": res["local_bytes"],
        "stack_bytes": res["stack_bytes"],
        "shared_bytes": int(getattr(compiled.metadata, "shared", 0) or 0),
        "tensor_core_opcode": opcode,
        "tensor_core_instructions": n_tc,
        "any_mma_instructions": n_any_tc,
        "tma_instructions": n_tma,
    }


# Kernels built for one architecture only (the TMA GEMM is what sm_90 runs; sm_80 keeps the cp.async kernel).
ARCH_ONLY = {"routed_linear_tma_kernel": 90}


def compile_report(archs=(80, 90), dtype: str = "bf16", workers: int | None = None) -> list[dict]:
    """Compile every shipped config for each ``sm_<arch>``; one record per (kernel variant, config, arch)."""
    items = [(item, arch) for arch in archs for item in compiled_kernels(dtype)
             if ARCH_ONLY.get(item[0], arch) == arch]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda ia: _record(ia[0], ia[1], dtype), items))


if __name__ == "__main__":  # python -m routed_lora.kernels.aot
    import json

    for rec in compile_report():
        print(json.dumps(rec))
