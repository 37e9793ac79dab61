"""Triton kernels of the routed-LoRA layer (kernels only; the launchers are in :mod:`.launch`).

Notation (DESIGN.md §1): x (M, K), W (N, K), b (N,), A (E, r, K), B (E, N, r), s the scaling, routes rho (M,)
in {-1, 0..E-1}. A_cat = A.reshape(E*r, K), B_cat[n, e*r + j] = B[e, n, j], h = x A_cat^T (M, E*r), and
mask[m, c] = (rho_m == c // r).

    forward   h_masked = (x A_cat^T) * mask                         routed_shrink_kernel      launch 1
              y        = x W^T + b + s * h_masked B_cat^T           routed_linear_kernel      launch 2
    backward  G        = (g B_cat) * mask                           routed_shrink_kernel      launch 1
              dx       = g W + s * G A_cat                          routed_linear_kernel      launch 2
              dA       = s * G^T x,  dB = s * g^T h_masked          routed_grad_ab_kernel     launch 3

On sm_90 (with a Triton that has ``tl.make_tensor_descriptor``) both GEMMs run as routed_linear_tma_kernel:
TMA descriptors, a persistent tile loop, 128x256x64 / 128x128x64 tiles, the same LoRA epilogue.

Three kernels cover the six products because the forward and the backward have the same shapes with other
strides: the "shrink" reduces a (rows, reduction) operand against an adapter tensor L read as (E*r, reduction)
with L[c, k] at ``(c // R) * stride_le + (c % R) * stride_lr + k * stride_lk`` (A for h, B for G); the "linear"
kernel is a GEMM with a low-rank epilogue whose right factor U[c, j] is read the same way (B for y, A for dx);
the "grad_ab" kernel computes both token reductions of the backward in one launch (its first TILES_A column
tiles are dA's, the others dB's). Adapter tensors are never copied or concatenated.

Split reductions without extra launches. When the row blocks alone would leave SMs idle, the shrink splits its
reduction (K, or N for G) and grad_ab splits its token range. Each split stores an fp32 partial of its tile in
a scratch buffer, then takes a ticket from the tile's int32 counter (``tl.atomic_add``, acq_rel, after a CTA
barrier); the program that draws the last ticket adds the partials in split order 0, 1, ..., S-1, casts, stores
the result and resets the counter to 0 for the next call. The sum has the same order whichever program arrives
last, so results are deterministic (repeated calls bit-identical) and no second kernel (torch.sum, a cast) runs.

Isolation under non-finite values. A token that adapter e does not own must contribute nothing to e's
gradient, even when its x or g holds a NaN or an Inf: 0 * NaN is NaN, so masking by multiplication is not
enough. Every masked quantity is produced by ``tl.where`` or a masked load (a selection), never by a product
with a 0/1 mask: h and G keep ``where(own, acc, 0)``; in grad_ab the token operand is selected per adapter
(``where(rho == e, x, 0)``), multiplied only with that adapter's columns, and the adapter's columns are
selected from the product, so a non-finite value at a token of adapter b or of route -1 reaches only b's
gradient (or none). An adapter without tokens gets exact zeros.

Rules kept in every kernel: fp32 accumulation (``tl.dot`` with an fp32 accumulator), runtime scalars cast to fp32
(``tl.cast(scaling, tl.float32)``: the same as ``.to(tl.float32)`` on a GPU, where torch.compile may hand a Python
float over as fp64, and it also accepts the plain Python float the interpreter passes), int64 row/column offsets
before the pointer maths, every tail masked, and every ``tl.dot`` dimension >= 16 (the launcher pads E*r with
masked columns: BLOCK_R >= 16, RP >= 16). The rank R is a constexpr: ``c // R`` and ``c % R`` become shifts for
the usual power-of-two ranks and the compiler sees runs of R contiguous adapter columns, so B (E, N, r), whose
contiguous axis is r, is read with vector loads instead of 64-bit scalar gathers.

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
    part_ptr,
    lock_ptr,
    # sizes
    M,
    K: tl.constexpr,
    E: tl.constexpr,
    K_PER_SPLIT,
    # strides
    stride_xm,
    stride_xk,
    stride_le,
    stride_lr,
    stride_lk,
    stride_om,
    stride_oc,
    # meta-parameters
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Routed shrink ``out = where(mask, x L^T, 0)``, (M, E*r) in out's dtype.

    Forward: x = tokens (M, K), L = A read as (E*r, K) -> out = h_masked. Backward: x = g (M, N) (so "K" is N),
    L = B read as (E*r, N) -> out = G.

    Grid: (cdiv(M, BLOCK_M), cdiv(E*r, BLOCK_R), SPLITS). Split p reduces over [p * K_PER_SPLIT,
    (p + 1) * K_PER_SPLIT) (a multiple of BLOCK_K). SPLITS = 1 stores the result directly; otherwise each split
    stores its fp32 (BLOCK_M, BLOCK_R) partial at ``part_ptr[tile, p]`` and the last of the tile's programs to
    take a ticket from ``lock_ptr[tile]`` sums the partials in split order and stores (module docstring).
    Tiles: x (BLOCK_M, BLOCK_K), L^T (BLOCK_K, BLOCK_R), accumulator (BLOCK_M, BLOCK_R) fp32.
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
    l_col = owner * stride_le + (offs_c % R) * stride_lr
    rho = tl.load(routes_ptr + offs_m, mask=m_in, other=-1).to(tl.int64)
    own = (rho[:, None] == owner[None, :]) & m_in[:, None] & c_in[None, :]

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

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc
    out_mask = m_in[:, None] & c_in[None, :]
    if SPLITS == 1:
        tl.store(out_ptrs, tl.where(own, acc, 0.0).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = pid_m * tl.num_programs(1) + pid_r
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        tile_part = part_ptr + tile.to(tl.int64) * (SPLITS * BLOCK_M * BLOCK_R) + offs_t
        tl.store(tile_part + pid_s * (BLOCK_M * BLOCK_R), acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (release)
        ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLITS - 1:  # the last split of this tile: sum in split order, store, reset the counter
            total = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
            for p in tl.static_range(SPLITS):
                total += tl.load(tile_part + p * (BLOCK_M * BLOCK_R), cache_modifier=".cg")
            tl.store(out_ptrs, tl.where(own, total, 0.0).to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


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
    N: tl.constexpr,
    K: tl.constexpr,
    E: tl.constexpr,
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
    R: tl.constexpr,
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
def routed_grad_ab_kernel(
    # pointers
    x_ptr,
    g_ptr,
    gp_ptr,
    h_ptr,
    routes_ptr,
    da_ptr,
    db_ptr,
    part_ptr,
    lock_ptr,
    # sizes
    M,
    K: tl.constexpr,
    N: tl.constexpr,
    E: tl.constexpr,
    M_PER_SPLIT,
    TILES_A: tl.constexpr,
    # strides
    stride_xm,
    stride_xk,
    stride_gm,
    stride_gn,
    stride_gpm,
    stride_gpc,
    stride_hm,
    stride_hc,
    stride_dae,
    stride_dar,
    stride_dak,
    stride_dbe,
    stride_dbn,
    stride_dbr,
    # meta-parameters
    scaling,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RP: tl.constexpr,
    APT: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Both token reductions of the backward in one launch, each adapter fed only by its own tokens:

        dA[e, j, k] = s * sum_{m: rho_m = e} G[m, e*r + j] x[m, k]       (dA_cat = s G^T x)
        dB[e, n, j] = s * sum_{m: rho_m = e} g[m, n] h[m, e*r + j]       (dB_cat = s g^T h_masked)

    One problem "out^T (BLOCK_K, r) = s * T^T L" with T the token operand (x for dA, g for dB) and L the masked
    (M, E*r) operand (G for dA, h for dB): program ids below TILES_A along axis 0 take dA's K tiles, the others
    dB's N tiles. Axis 1 takes APT adapters at a time: the adapter-column tile is (APT * RP) wide, RP the rank
    padded to a power of two >= 16, so a tile holds whole adapters (column c: adapter pid_r * APT + c // RP,
    rank index c % RP, used when < R). For each of its adapters e the program multiplies
    ``where(rho == e, T, 0)^T`` with L (loaded with the route mask) and keeps only e's columns of the product
    (``tl.where``): a non-finite T or L value at a token of another adapter never meets e's columns.
    Axis 2 splits the tokens into SPLITS ranges of M_PER_SPLIT rows (a multiple of BLOCK_M), reduced in split
    order by the last program of the tile (module docstring). Tiles: T^T (BLOCK_K, BLOCK_M), L (BLOCK_M,
    APT * RP), accumulator (BLOCK_K, APT * RP) fp32: the large side first so Hopper can use wgmma.
    """
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    BLOCK_C: tl.constexpr = APT * RP
    is_a = pid_t < TILES_A
    # The two problems differ only in pointers, sizes and strides (selected as scalars, one code path).
    t_ptr = tl.where(is_a, x_ptr, g_ptr)
    l_ptr = tl.where(is_a, gp_ptr, h_ptr)
    o_ptr = tl.where(is_a, da_ptr, db_ptr)
    size_k = tl.where(is_a, K, N)
    stride_tm = tl.where(is_a, stride_xm, stride_gm)
    stride_tk = tl.where(is_a, stride_xk, stride_gn)
    stride_lm = tl.where(is_a, stride_gpm, stride_hm)
    stride_lc = tl.where(is_a, stride_gpc, stride_hc)
    stride_oe = tl.where(is_a, stride_dae, stride_dbe)
    stride_or = tl.where(is_a, stride_dar, stride_dbr)
    stride_ok = tl.where(is_a, stride_dak, stride_dbn)
    tile_k = tl.where(is_a, pid_t, pid_t - TILES_A)

    offs_k = tile_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = offs_k < size_k
    offs_c = tl.arange(0, BLOCK_C)
    local = offs_c // RP  # adapter of column c within the tile
    rank = offs_c % RP
    adapter = pid_r * APT + local
    c_in = (rank < R) & (adapter < E)
    l_col = (adapter * R + rank).to(tl.int64) * stride_lc
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)

    acc = tl.full((BLOCK_K, BLOCK_C), 0.0, tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_in = offs_m < m_end
        rho = tl.load(routes_ptr + offs_m, mask=m_in, other=-1)
        t = tl.load(
            t_ptr + offs_m[:, None] * stride_tm + offs_k[None, :] * stride_tk,
            mask=m_in[:, None] & k_in[None, :],
            other=0.0,
        )
        own = (rho[:, None] == adapter[None, :]) & c_in[None, :]
        lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + l_col[None, :], mask=own, other=0.0)
        if APT == 1:
            # One adapter per tile: L has no other adapter's columns, selecting T's rows is enough.
            t_e = tl.where((rho == pid_r)[:, None], t, 0.0)
            acc = tl.dot(tl.trans(t_e), lt, acc, input_precision=DOT_PRECISION)
        else:
            for a in tl.static_range(APT):
                t_e = tl.where((rho == pid_r * APT + a)[:, None], t, 0.0)
                part = tl.dot(tl.trans(t_e), lt, input_precision=DOT_PRECISION)
                acc += tl.where((local == a)[None, :], part, 0.0)
    acc = acc * tl.cast(scaling, tl.float32)

    out_col = adapter.to(tl.int64) * stride_oe + rank * stride_or
    out_ptrs = o_ptr + offs_k[:, None] * stride_ok + out_col[None, :]
    out_mask = k_in[:, None] & c_in[None, :]
    if SPLITS == 1:
        tl.store(out_ptrs, acc.to(o_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = pid_t * tl.num_programs(1) + pid_r
        offs_t = tl.arange(0, BLOCK_K)[:, None] * BLOCK_C + offs_c[None, :]
        tile_part = part_ptr + tile.to(tl.int64) * (SPLITS * BLOCK_K * BLOCK_C) + offs_t
        tl.store(tile_part + pid_s * (BLOCK_K * BLOCK_C), acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken (release)
        ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLITS - 1:  # the last split of this tile: sum in split order, store, reset the counter
            total = tl.full((BLOCK_K, BLOCK_C), 0.0, tl.float32)
            for p in tl.static_range(SPLITS):
                total += tl.load(tile_part + p * (BLOCK_K * BLOCK_C), cache_modifier=".cg")
            tl.store(out_ptrs, total.to(o_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def routed_linear_tma_kernel(
    # pointers
    a_ptr,
    w_ptr,
    bias_ptr,
    l_ptr,
    u_ptr,
    out_ptr,
    # sizes
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    E: tl.constexpr,
    M_BUCKET,
    # strides
    stride_am,
    stride_wr,
    stride_lm,
    stride_lc,
    stride_ue,
    stride_ur,
    stride_un,
    stride_om,
    # meta-parameters
    scaling,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    TRANS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Hopper form of :func:`routed_linear_kernel`: ``out = a Wt + b + s * L U`` with TMA tensor descriptors
    and a persistent tile loop.

    a (M, K) row-major, W row-major: TRANS_W (forward) W is (N, K) and Wt = W^T, read as (BLOCK_N, BLOCK_K)
    tiles and transposed in shared memory; otherwise (dx) W is (K, N) as stored (Wt = W). The operands and the
    output go through ``tl.make_tensor_descriptor`` (TMA loads and stores: the hardware clips and zero-fills
    the tails, so no masks and no address maths in the K loop). The P programs of the grid (at most one per SM)
    walk the tiles ``pid, pid + P, ...`` in GROUP_M-grouped order. The LoRA epilogue is the plain kernel's:
    L (BLOCK_M, BLOCK_R) @ U (BLOCK_R, BLOCK_N) added into the fp32 accumulator after dividing it by s, then
    multiplied by s once; bias added, cast, one TMA store. Needs 16-byte aligned bases and row strides (the
    launcher checks and otherwise uses the plain kernel). ``M_BUCKET`` is only an autotuning key.
    """
    pid = tl.program_id(0)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if TRANS_W:
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[N, K], strides=[stride_wr, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
    else:
        w_desc = tl.make_tensor_descriptor(
            w_ptr, shape=[K, N], strides=[stride_wr, 1], block_shape=[BLOCK_K, BLOCK_N]
        )
    out_desc = tl.make_tensor_descriptor(
        out_ptr, shape=[M, N], strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_N]
    )
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    ER = E * R
    s = tl.cast(scaling, tl.float32)
    s_safe = tl.where(s == 0.0, 1.0, s)
    er_used = tl.where(s == 0.0, 0, ER)  # s = 0: no LoRA term at all

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([off_m, k0])
            if TRANS_W:
                w = w_desc.load([off_n, k0]).T
            else:
                w = w_desc.load([k0, off_n])
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

        offs_m = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        m_in = offs_m < M
        n_in = offs_n < N
        # The epilogue of routed_linear_kernel, line for line. Not a shared @triton.jit helper: the launcher runs
        # these kernels under the interpreter through InterpretedFunction built at run time, and a JITFunction
        # called from inside one raises ("Cannot call @triton.jit'd outside of the scope of a kernel").
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
        out_desc.store([off_m, off_n], acc.to(out_ptr.dtype.element_ty))
