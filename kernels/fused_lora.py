"""Triton kernels of the routed-LoRA layer (kernels only; the launchers are in :mod:`.launch`).

Notation (DESIGN.md §1): x (M, K), W (N, K), b (N,), A (E, r, K), B (E, N, r), s the scaling, routes rho (M,)
in {-1, 0..E-1}. A_cat = A.reshape(E*r, K), B_cat[n, e*r + j] = B[e, n, j], h = x A_cat^T (M, E*r), and
mask[m, c] = (rho_m == c // r).

    forward   h_masked = (x A_cat^T) * mask                                  routed_shrink_kernel
              y        = x W^T + b + s * h_masked B_cat^T                    routed_linear_kernel
    backward  G        = (g B_cat) * mask,  dB = s * g^T h_masked (one pass)  routed_shrink_kernel, FUSE_DB
              dx       = g W + s * G A_cat                                    routed_linear_kernel
              dA       = s * G^T x                                            routed_grad_a_kernel

Three kernels cover the five products because the forward and the backward have the same shapes with other
strides: the "shrink" reduces a (rows, reduction) operand against an adapter tensor L read as (E*r, reduction)
with L[c, k] at ``(c // R) * stride_le + (c % R) * stride_lr + k * stride_lk`` (A for h, B for G), and the
"linear" kernel is a GEMM with a low-rank epilogue whose right factor U[c, j] is read the same way (B for y,
A for dx). Adapter tensors are never copied or concatenated.

Rules kept in every kernel: fp32 accumulation (``tl.dot`` with an fp32 accumulator), runtime scalars cast to fp32
(``tl.cast(scaling, tl.float32)``: the same as ``.to(tl.float32)`` on a GPU, where torch.compile may hand a Python
float over as fp64, and it also accepts the plain Python float the interpreter passes), int64 row/column offsets
before the pointer maths, every tail masked, and every ``tl.dot`` dimension >= 16 (the launcher pads E*r with
masked columns: BLOCK_R >= 16). The rank R is a constexpr: ``c // R`` and ``c % R`` become shifts for the usual
power-of-two ranks and the compiler sees runs of R contiguous adapter columns, so B (E, N, r), whose contiguous
axis is r, is read with vector loads instead of 64-bit scalar gathers. Masked-out route entries are produced by
masked loads or ``tl.where``, so a token that an adapter does not own contributes an exact zero to that adapter.

Only builtins of ``triton.language`` are used (``tl.full``, not the ``@jit`` helpers ``tl.zeros`` / ``tl.cdiv``):
the launchers run these kernels in the interpreter whenever a CPU tensor arrives with TRITON_INTERPRET=1, even
if triton was imported without it, and the interpreter cannot call a compiled-mode ``@jit`` helper.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def routed_shrink_kernel(
    # pointers
    x_ptr,
    l_ptr,
    routes_ptr,
    out_ptr,
    h_ptr,
    db_ptr,
    # sizes
    M,
    K,
    R: tl.constexpr,
    E,
    K_PER_SPLIT,
    M_BUCKET,
    # strides
    stride_xm,
    stride_xk,
    stride_le,
    stride_lr,
    stride_lk,
    stride_os,
    stride_om,
    stride_oc,
    stride_hm,
    stride_hc,
    stride_dbp,
    stride_dbe,
    stride_dbk,
    stride_dbr,
    # meta-parameters
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FUSE_DB: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Routed shrink: ``out = (x L^T) * mask`` and, with FUSE_DB, ``dB = s * x^T (h * mask)`` in the same pass.

    Forward: x = tokens (M, K), L = A read as (E*r, K)  -> out = h_masked (M, E*r).
    Backward (FUSE_DB): x = g (M, N) (so "K" is N), L = B read as (E*r, N) -> out = G (M, E*r); the same g
    tile also gives the dB partial ``s * g_tile^T (h_masked tile)`` (BLOCK_K, BLOCK_R) for this block of rows,
    stored at ``db_ptr[pid_m, e, n, j]`` (DETERMINISTIC: a per-row-block fp32 workspace (P, E, N, r) that the
    launcher sums in a fixed order) or added with ``tl.atomic_add`` into an fp32 (E, N, r) buffer.

    Grid: (cdiv(M, BLOCK_M), cdiv(E*r, BLOCK_R), splits). Split p reduces over [p * K_PER_SPLIT,
    (p + 1) * K_PER_SPLIT) (a multiple of BLOCK_K) and stores its masked partial at ``out_ptr + p * stride_os``:
    with one split that is the result in x.dtype, with several an fp32 (splits, M, E*r) buffer the launcher sums
    in a fixed order (more programs for a pass that is memory-bound; each dB row n still has a single writer).
    Tiles: x (BLOCK_M, BLOCK_K), L^T (BLOCK_K, BLOCK_R), accumulator (BLOCK_M, BLOCK_R) fp32; the dB partial is
    (BLOCK_K, BLOCK_M) @ (BLOCK_M, BLOCK_R), the large side first so Hopper can use wgmma. ``M_BUCKET`` is only
    an autotuning key.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    ER = E * R
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    c_in = offs_c < ER
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    owner = offs_c // R
    rank = offs_c % R
    l_col = owner * stride_le + rank * stride_lr
    rho = tl.load(routes_ptr + offs_m, mask=m_in, other=-1).to(tl.int64)
    own = (rho[:, None] == owner[None, :]) & m_in[:, None] & c_in[None, :]

    if FUSE_DB:
        s = tl.cast(scaling, tl.float32)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_c[None, :] * stride_hc, mask=own, other=0.0)
        db_col = pid_m.to(tl.int64) * stride_dbp + owner * stride_dbe + rank * stride_dbr

    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_in = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_in[:, None] & k_in[None, :],
            other=0.0,
        )
        lt = tl.load(
            l_ptr + offs_k[:, None] * stride_lk + l_col[None, :],
            mask=k_in[:, None] & c_in[None, :],
            other=0.0,
        )
        acc = tl.dot(x, lt, acc, input_precision=DOT_PRECISION)
        if FUSE_DB:
            part = tl.dot(tl.trans(x), h, input_precision=DOT_PRECISION) * s
            db_ptrs = db_ptr + offs_k[:, None] * stride_dbk + db_col[None, :]
            db_mask = k_in[:, None] & c_in[None, :]
            if DETERMINISTIC:
                tl.store(db_ptrs, part, mask=db_mask)
            else:
                tl.atomic_add(db_ptrs, part, mask=db_mask)

    acc = tl.where(own, acc, 0.0)
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & c_in[None, :])


@triton.jit
def routed_linear_kernel(
    # pointers
    a_ptr,
    w_ptr,
    bias_ptr,
    l_ptr,
    u_ptr,
    out_ptr,
    # sizes
    M,
    N,
    K,
    R: tl.constexpr,
    E,
    M_BUCKET,
    # strides
    stride_am,
    stride_ak,
    stride_wk,
    stride_wn,
    stride_lm,
    stride_lc,
    stride_ue,
    stride_ur,
    stride_un,
    stride_om,
    stride_on,
    # meta-parameters
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    BACKBONE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """GEMM with a low-rank epilogue: ``out = a Wt + b + s * L U``, written once.

    Forward: a = x (M, K), Wt[k, n] = W[n, k], L = h_masked (M, E*r), U[c, n] = B[c // r, n, c % r], bias b.
    Backward: a = g (M, N) (so "K" is N and "N" is K), Wt[n, k] = W[n, k], L = G, U[c, k] = A[c // r, c % r, k].

    Variants (constexpr flags): BACKBONE=False skips the GEMM and writes ``b + s * L U`` only (the cuBLAS
    variant then accumulates the backbone product into it with ``out.addmm_(a, Wt)``, cuBLAS reading ``out`` in
    its epilogue with beta = 1, so ``out`` is never read-modify-written by a separate pass); HAS_BIAS adds b.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), program ids grouped by GROUP_M row blocks for L2 reuse of Wt.
    Tiles: a (BLOCK_M, BLOCK_K), Wt (BLOCK_K, BLOCK_N), accumulator (BLOCK_M, BLOCK_N) fp32; epilogue loops over
    E*r in steps of BLOCK_R: L (BLOCK_M, BLOCK_R) @ U (BLOCK_R, BLOCK_N) into the same fp32 accumulator after
    dividing it by s, then multiplying by s once (no second accumulator; s = 0 skips the LoRA term). ``M_BUCKET``
    is only an autotuning key.
    """
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: a jit function the interpreter cannot always call
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_in[:, None] & n_in[None, :]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if BACKBONE:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_in = offs_k < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=m_in[:, None] & k_in[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=k_in[:, None] & n_in[None, :],
                other=0.0,
            )
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    # The LoRA product accumulates into the same registers: acc = s * (acc / s + L U) (one fp32 rounding more,
    # no second (BLOCK_M, BLOCK_N) accumulator, which would spill at 128 x 128 tiles).
    ER = E * R
    s = tl.cast(scaling, tl.float32)
    s_safe = tl.where(s == 0.0, 1.0, s)
    er_used = tl.where(s == 0.0, 0, ER)  # s = 0: no LoRA term at all
    acc = acc * (1.0 / s_safe)
    for c0 in range(0, er_used, BLOCK_R):
        offs_c = c0 + tl.arange(0, BLOCK_R).to(tl.int64)
        c_in = offs_c < ER
        lt = tl.load(
            l_ptr + offs_m[:, None] * stride_lm + offs_c[None, :] * stride_lc,
            mask=m_in[:, None] & c_in[None, :],
            other=0.0,
        )
        u_row = (offs_c // R) * stride_ue + (offs_c % R) * stride_ur
        u = tl.load(
            u_ptr + u_row[:, None] + offs_n[None, :] * stride_un,
            mask=c_in[:, None] & n_in[None, :],
            other=0.0,
        )
        acc = tl.dot(lt, u, acc, input_precision=DOT_PRECISION)
    acc = acc * s_safe
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def routed_grad_a_kernel(
    # pointers
    g_ptr,
    x_ptr,
    out_ptr,
    # sizes
    M,
    K,
    R: tl.constexpr,
    E,
    M_PER_SPLIT,
    M_BUCKET,
    # strides
    stride_gm,
    stride_gc,
    stride_xm,
    stride_xk,
    stride_op,
    stride_oe,
    stride_or,
    stride_ok,
    # meta-parameters
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``dA[e, j, k] = s * sum_m G[m, e*r + j] x[m, k]`` (dA_cat = s G^T x), G already masked by route.

    Computed transposed, ``dA_cat^T tile (BLOCK_K, BLOCK_R) = x^T (BLOCK_K, BLOCK_M) @ G (BLOCK_M, BLOCK_R)``,
    so the large side (K) is the wgmma M side. Grid: (cdiv(K, BLOCK_K), cdiv(E*r, BLOCK_R), splits); split p
    reduces rows [p * M_PER_SPLIT, (p + 1) * M_PER_SPLIT) (M_PER_SPLIT a multiple of BLOCK_M) and stores its
    fp32 partial at ``out_ptr[p, e, j, k]`` (DETERMINISTIC: a (splits, E, r, K) workspace summed in a fixed
    order by the launcher) or adds it with ``tl.atomic_add`` (stride_op = 0). ``M_BUCKET``: autotuning key.
    """
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    ER = E * R
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_in = offs_k < K
    c_in = offs_c < ER
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)

    acc = tl.full((BLOCK_K, BLOCK_R), 0.0, tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_in = offs_m < m_end
        xt = tl.load(
            x_ptr + offs_k[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=k_in[:, None] & m_in[None, :],
            other=0.0,
        )
        g = tl.load(
            g_ptr + offs_m[:, None] * stride_gm + offs_c[None, :] * stride_gc,
            mask=m_in[:, None] & c_in[None, :],
            other=0.0,
        )
        acc = tl.dot(xt, g, acc, input_precision=DOT_PRECISION)
    acc = acc * tl.cast(scaling, tl.float32)

    out_col = pid_s.to(tl.int64) * stride_op + (offs_c // R) * stride_oe + (offs_c % R) * stride_or
    out_ptrs = out_ptr + offs_k[:, None] * stride_ok + out_col[None, :]
    out_mask = k_in[:, None] & c_in[None, :]
    if DETERMINISTIC:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
