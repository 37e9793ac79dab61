"""Our CPU LoRA op for vLLM (routed_lora/integrations/vllm/cpu_lora.py) against a float64 per-token loop, on odd
shapes: several output slices of odd sizes, an offset into a wider output, slot -1 beside used slots, one slot
only, no slot at all, a scale, the fused call and the shrink/expand pair (whose buffer lies in between).

The op is pure PyTorch, so these run in the main environment too; the last tests drive vLLM's CPU punica wrapper
as patched by the plugin (they need vLLM and are skipped without it)."""

from __future__ import annotations

import pytest
import torch

from routed_lora.integrations.vllm.cpu_lora import SlotPlan, lora_expand_, lora_linear_, lora_shrink_

TOL = 1e-5  # fp32 op vs float64 loop, |values| ~ 1


def _stacks(L, R, K, slices, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = tuple(torch.randn(L, 1, R, K, generator=g, dtype=dtype) / K ** 0.5 for _ in slices)
    B = tuple(torch.randn(L, 1, n, R, generator=g, dtype=dtype) / R ** 0.5 for n in slices)
    return A, B


def _loop(y, x, A, B, idx, scale, slices, offset):
    """The definition, one token and one slice at a time, in float64: y_t[o_s:o_s+N_s] += s B_s[l] A_s[l] x_t."""
    y = y.double().clone()
    for t, l in enumerate(idx.tolist()):
        if l < 0:
            continue  # slot -1: no LoRA term
        o = offset
        for a, b, n in zip(A, B, slices):
            y[t, o:o + n] += scale * (b[l, 0, :n].double() @ (a[l, 0].double() @ x[t].double()))
            o += n
    return y


IDX_CASES = {
    "mixed with -1": lambda T: torch.tensor([(3 * t) % 5 - 1 for t in range(T)]),  # -1, 2, 0, 3, 1, ...
    "two slots": lambda T: torch.tensor([t % 2 * 3 for t in range(T)]),  # slots 0 and 3
    "one slot": lambda T: torch.full((T,), 2),
    "one slot and -1": lambda T: torch.tensor([2 if t % 3 else -1 for t in range(T)]),
    "all -1": lambda T: torch.full((T,), -1),
}


@pytest.mark.parametrize("case", list(IDX_CASES))
@pytest.mark.parametrize("slices", [(7,), (13, 5, 5), (9, 11)])
def test_lora_linear_matches_per_token_loop(case, slices):
    T, K, L, R, offset, scale = 37, 24, 4, 6, 3, 0.7
    A, B = _stacks(L, R, K, slices, seed=len(slices))
    idx = IDX_CASES[case](T)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, K, generator=g)
    y0 = torch.randn(T, offset + sum(slices) + 4, generator=g)  # columns before and after the LoRA slices
    want = _loop(y0, x, A, B, idx, scale, slices, offset)
    y = y0.clone()
    lora_linear_(y, x, A, B, scale, slices, SlotPlan(idx, L), offset=offset)
    assert (y.double() - want).abs().max().item() <= TOL
    # columns outside the slices and rows on -1 are untouched, bit for bit
    none = idx < 0
    assert torch.equal(y[none], y0[none])
    assert torch.equal(y[:, :offset], y0[:, :offset]) and torch.equal(y[:, offset + sum(slices):],
                                                                      y0[:, offset + sum(slices):])
    if case != "all -1":
        assert (want - y0.double()).abs().max() > 0.1  # the LoRA term is there to be got wrong


def test_cached_operands_follow_writes_into_the_stacks():
    """The op keeps the stacked A (and B) of a layer between calls; vLLM writes a newly loaded adapter into a slot
    in place (``set_lora`` copies, ``reset_lora`` zeroes, under ``torch.inference_mode``), and each write must
    reach the next call: for the fused call and for the shrink/expand pair, slot by slot."""
    T, K, L, R, slices = 23, 16, 3, 4, (7, 5, 6)
    A, B = _stacks(L, R, K, slices, seed=11)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(T, K, generator=g)
    for idx in (torch.tensor([t % 3 - 1 for t in range(T)]), torch.full((T,), 1)):
        plan = SlotPlan(idx, L)
        for step in range(4):
            y = torch.zeros(T, sum(slices))
            lora_linear_(y, x, A, B, 1.0, slices, plan)
            assert (y.double() - _loop(torch.zeros(T, sum(slices)), x, A, B, idx, 1.0, slices, 0)).abs().max() <= TOL
            bufs = tuple(torch.zeros(T, R) for _ in slices)
            lora_shrink_(bufs, x, A, 1.0, plan)
            y2 = torch.zeros(T, sum(slices))
            lora_expand_(y2, bufs, B, slices, plan)
            assert (y2 - y).abs().max() <= TOL
            with torch.inference_mode():  # as vLLM loads an adapter: copy into slot `step % L`, or zero it
                s = step % len(slices)
                if step == 2:
                    A[s][1] = 0
                    B[s][1] = 0
                else:
                    A[s][1, 0, :, : K - 1].copy_(torch.randn(R, K - 1, generator=g))
                    B[s][1, 0].copy_(torch.randn(slices[s], R, generator=g))


@pytest.mark.parametrize("case", list(IDX_CASES))
@pytest.mark.parametrize("stacked_buffer", [False, True])
def test_shrink_then_expand_matches_per_token_loop(case, stacked_buffer):
    """vLLM's row-parallel layers call add_shrink, (all-reduce), add_expand with a buffer of each token's own
    slot's R values; the buffer arrives as a tuple or as one (S, T, R) tensor."""
    T, K, L, R, slices, scale = 29, 17, 4, 5, (6, 10, 3), 1.3
    A, B = _stacks(L, R, K, slices, seed=7)
    idx = IDX_CASES[case](T)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(2))
    bufs = torch.full((len(slices), T, R), float("nan")) if stacked_buffer else \
        tuple(torch.full((T, R), float("nan")) for _ in slices)  # every entry must be written
    plan = SlotPlan(idx, L)
    lora_shrink_(bufs, x, A, scale, plan)
    for s, a in enumerate(A):  # each token's own slot's scaled shrink, zero for -1
        want = torch.stack([scale * a[l, 0].double() @ x[t].double() if l >= 0 else torch.zeros(R, dtype=torch.double)
                            for t, l in enumerate(idx.tolist())])
        assert (bufs[s].double() - want).abs().max().item() <= TOL
    y0 = torch.randn(T, sum(slices))
    y = y0.clone()
    lora_expand_(y, bufs, B, slices, plan)
    assert (y.double() - _loop(y0, x, A, B, idx, scale, slices, 0)).abs().max().item() <= TOL


def test_expand_ignores_buffer_rows_of_slot_minus_one_and_can_overwrite():
    """The expand does not rely on the shrink having zeroed -1 rows (the embedding layer's buffer is A rows
    gathered for slot 0 there); ``add_inputs=False`` writes B @ buffer, zero for -1 rows."""
    T, L, R, N = 9, 3, 4, 8
    _, B = _stacks(L, R, 1, (N,), seed=3)
    idx = torch.tensor([-1, 0, 1, 2, -1, 2, 1, 0, -1])
    buf = torch.randn(T, R, generator=torch.Generator().manual_seed(4))  # non-zero on -1 rows too
    want = torch.stack([B[0][l, 0].double() @ buf[t].double() if l >= 0 else torch.zeros(N, dtype=torch.double)
                        for t, l in enumerate(idx.tolist())])
    y = torch.randn(T, N)
    lora_expand_(y, (buf,), B, (N,), SlotPlan(idx, L), add_inputs=False)
    assert (y.double() - want).abs().max().item() <= TOL
    y0 = torch.randn(T, N)
    y = y0.clone()
    lora_expand_(y, (buf,), B, (N,), SlotPlan(idx, L))
    assert (y.double() - y0.double() - want).abs().max().item() <= TOL


def test_padded_output_rows_of_b():
    """An output slice narrower than B's rows uses B's first rows (vLLM pads the LoRA vocabulary for lm_head)."""
    T, K, L, R = 5, 8, 2, 3
    A, B = _stacks(L, R, K, (12,), seed=5)
    idx = torch.tensor([0, 1, -1, 1, 0])
    x = torch.randn(T, K)
    y0 = torch.randn(T, 10)
    y = y0.clone()
    lora_linear_(y, x, A, B, 1.0, (10,), SlotPlan(idx, L))
    assert (y.double() - _loop(y0, x, A, B, idx, 1.0, (10,), 0)).abs().max().item() <= TOL


def test_bfloat16_model_shrinks_in_float32():
    """As vLLM's ops: the shrink in float32 (the buffer dtype), the expand in the output's dtype."""
    T, K, L, R, slices = 11, 32, 3, 4, (16, 8)
    A, B = _stacks(L, R, K, slices, seed=6, dtype=torch.bfloat16)
    idx = torch.tensor([t % 3 - 1 for t in range(T)])
    x = torch.randn(T, K).bfloat16()
    y0 = torch.randn(T, sum(slices)).bfloat16()
    y = y0.clone()
    lora_linear_(y, x, A, B, 1.0, slices, SlotPlan(idx, L))
    assert y.dtype == torch.bfloat16
    assert (y.double() - _loop(y0, x, A, B, idx, 1.0, slices, 0)).abs().max().item() <= 0.05


def test_errors_name_the_argument():
    A, B = _stacks(3, 4, 8, (5,), seed=0)
    x, y = torch.randn(6, 8), torch.zeros(6, 5)
    with pytest.raises(ValueError, match=r"idx: expected slot indices in \[-1, 3\).*got \[3\]"):
        SlotPlan(torch.tensor([0, 3, -1, 0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"idx: expected slot indices .* got \[-2\]"):
        SlotPlan(torch.tensor([-2, 0]), 3)
    with pytest.raises(ValueError, match="idx: expected a 1-D integer tensor"):
        SlotPlan(torch.zeros(6), 3)
    plan = SlotPlan(torch.tensor([0, 1, -1, 0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"x: expected 6 rows .* got 5"):
        lora_linear_(torch.zeros(5, 5), torch.randn(5, 8), A, B, 1.0, (5,), plan)
    with pytest.raises(ValueError, match=r"y: expected a 2-D output with 6 rows"):
        lora_linear_(torch.zeros(7, 5), x, A, B, 1.0, (5,), plan)
    with pytest.raises(ValueError, match=r"x: expected \(tokens, in_features K=8\) as the lora_a stacks, got \(6, 7\)"):
        lora_linear_(y, torch.randn(6, 7), A, B, 1.0, (5,), plan)
    with pytest.raises(ValueError, match=r"lora_a\[1\]: expected \(rank R=4, in_features K=8\).* got \(4, 7\)"):
        lora_linear_(torch.zeros(6, 10), x, (A[0], A[0][..., :7]), (B[0], B[0]), 1.0, (5, 5), plan)
    with pytest.raises(ValueError, match=r"lora_b\[0\]: expected rank R=4 in its last dim, got \(5, 3\)"):
        lora_linear_(y, x, A, (B[0][..., :3],), 1.0, (5,), plan)
    with pytest.raises(ValueError, match=r"y: expected at least offset \+ sum\(output_slices\) = 7 columns, got 5"):
        lora_linear_(y, x, A, B, 1.0, (5,), plan, offset=2)
    with pytest.raises(ValueError, match=r"lora_b\[0\]: expected a slot stack of shape \(L=3"):
        lora_linear_(y, x, A, (B[0][:2],), 1.0, (5,), plan)
    with pytest.raises(ValueError, match="output_slices: expected one size per lora_b slice"):
        lora_linear_(y, x, A, B, 1.0, (2, 3), plan)
    with pytest.raises(ValueError, match=r"buffers\[0\]: expected shape \(6, >= 4\), got \(6, 3\)"):
        lora_shrink_((torch.zeros(6, 3),), x, A, 1.0, plan)


# ------------------------------------------------------------------------------------------------------------
# vLLM's CPU punica wrapper with the plugin's patch: the methods vLLM's LoRA layers call
# ------------------------------------------------------------------------------------------------------------
def _wrapper(monkeypatch, mode, index_mapping, prompt_mapping, lora_ids, routed=False):
    pytest.importorskip("vllm")
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from routed_lora.integrations.vllm import plugin

    plugin.register()
    monkeypatch.setenv("ROUTED_LORA_VLLM_CPU_OP", mode)
    monkeypatch.setattr(plugin.routing.state, "routed_batch", routed)
    w = PunicaWrapperCPU(64, 8, device="cpu")
    mapping = LoRAMapping(tuple(index_mapping), tuple(prompt_mapping), is_prefill=True)
    w.update_metadata(mapping, lora_ids, len(lora_ids), 100)
    return w


@pytest.mark.vllm
def test_patched_punica_wrapper_matches_per_token_loop(monkeypatch):
    """add_lora_linear (packed q/k/v: 3 slices), add_shrink + add_expand, add_lora_logits, through vLLM's
    wrapper with our op on: LoRA ids -> slots via vLLM's own mapping, id 0 -> slot -1 (no LoRA)."""
    lora_ids = [11, None, 12, 13]  # slot -> LoRA id; slot 1 empty
    ids = [11, 0, 12, 13, 12, 0, 11, 11, 13, 0, 12]  # per token; 0 = no LoRA
    slot = {11: 0, 12: 2, 13: 3, 0: -1}
    idx = torch.tensor([slot[i] for i in ids])
    w = _wrapper(monkeypatch, "all", ids, [12, 0, 13], lora_ids)
    assert torch.equal(w.token_lora_indices, idx) and w._rl_op
    T, K, L, R, slices = len(ids), 16, len(lora_ids), 8, (16, 8, 8)
    A, B = _stacks(L, R, K, slices, seed=9)
    x = torch.randn(T, K)
    y0 = torch.randn(T, sum(slices))
    y = y0.clone()
    w.add_lora_linear(y, x, A, B, 1.0, slices)
    assert (y.double() - _loop(y0, x, A, B, idx, 1.0, slices, 0)).abs().max().item() <= TOL
    # row-parallel layers: shrink into a zeroed (S, T, R) float32 buffer, then expand from it
    buf = torch.zeros(1, T, R)
    y = y0[:, :16].clone()
    w.add_shrink(buf, x, A[:1], 1.0)
    w.add_expand(y, buf, B[:1], (16,), offset_start=0, add_input=True)
    assert (y.double() - _loop(y0[:, :16], x, A[:1], B[:1], idx, 1.0, (16,), 0)).abs().max().item() <= TOL
    # lm_head LoRA: one row per request (the sampler's indices), B padded beyond the vocabulary
    A1, B1 = _stacks(L, R, K, (24,), seed=10)
    xs, ys0 = torch.randn(3, K), torch.randn(3, 20)
    ys = ys0.clone()
    w.add_lora_logits(ys, xs, A1[0], B1[0], 1.0)
    want = _loop(ys0, xs, A1, B1, torch.tensor([2, -1, 3]), 1.0, (20,), 0)
    assert (ys.double() - want).abs().max().item() <= TOL


@pytest.mark.vllm
def test_patched_punica_wrapper_is_inert_outside_routed_batches(monkeypatch):
    """Default mode: a batch without routed requests keeps vLLM's own metadata and ops."""
    w = _wrapper(monkeypatch, "routed", [11, 11, 0], [11, 0], [11, None], routed=False)
    assert not w._rl_op and w.is_prefill  # vLLM's prefill (sgmv) path, untouched
    w = _wrapper(monkeypatch, "routed", [11, 11, 0], [11, 0], [11, None], routed=True)
    assert w._rl_op and not w.is_prefill
    w = _wrapper(monkeypatch, "off", [11, 11, 0], [11, 0], [11, None], routed=True)
    assert not w._rl_op and not w.is_prefill  # op off: vLLM's bgmv ops with the defect fixes
    with pytest.raises(ValueError, match="ROUTED_LORA_VLLM_CPU_OP: expected 'routed', 'all' or 'off', got 'yes'"):
        _wrapper(monkeypatch, "yes", [11], [11], [11, None])


@pytest.mark.vllm
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_array_metadata_equals_vllms(seed):
    """The plugin writes the punica index buffers with array operations (``_base_metadata_``); they must equal
    vLLM's own ``_update_base_metadata`` (a Python loop over the tokens) on random mappings with empty slots and
    tokens without LoRA."""
    pytest.importorskip("vllm")
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from routed_lora.integrations.vllm.plugin import _base_metadata_

    g = torch.Generator().manual_seed(seed)
    lora_ids = [21, None, 7, 30, None][: 3 + seed]
    pool = [0] + [i for i in lora_ids if i is not None]
    T, S = 40 + 13 * seed, 5 + seed
    ids = [pool[j] for j in torch.randint(0, len(pool), (T,), generator=g).tolist()]
    prompt = [pool[j] for j in torch.randint(0, len(pool), (S,), generator=g).tolist()]
    mapping = LoRAMapping(tuple(ids), tuple(prompt), is_prefill=True)
    want, got = PunicaWrapperCPU(128, 8, device="cpu"), PunicaWrapperCPU(128, 8, device="cpu")
    want._update_base_metadata(mapping, lora_ids, len(lora_ids), 1000)
    _base_metadata_(got, mapping, lora_ids, len(lora_ids), 1000)
    assert got.indices_len == want.indices_len
    for name in ("_token_lora_indices", "_sampler_indices", "_sampler_indices_padded", "_embeddings_indices"):
        n = want.indices_len[0] if name in ("_token_lora_indices", "_embeddings_indices") else want.indices_len[1]
        assert torch.equal(getattr(got, name)[:n], getattr(want, name)[:n]), name
    assert (want._token_lora_indices[:T] == -1).any() and (want._token_lora_indices[:T] >= 0).any()
