"""Layer fuzz (issue 14 item 5): random cases (M = 0, non-contiguous and 3-d x, fp32/fp16/bf16, E 1-8, r 1-64,
every route mix, non-finite inputs) of forward + backward against a float64 per-token oracle with hand-derived
gradients (routed_lora.testing: shares no code with the layer)."""

from __future__ import annotations

import pytest

from routed_lora.testing import ROUTE_MIXES, check_layer, layer_cases, run_layer

N_CASES = 520
CHUNK = 40
CASES = layer_cases(N_CASES, seed=0)


def test_the_generator_covers_the_issue_list():
    assert len(CASES) >= 500
    assert any(c.M == 0 for c in CASES)
    assert {c.dtype for c in CASES} == {"float32", "float16", "bfloat16"}
    assert {1, 8} <= {c.E for c in CASES} and {1, 64} <= {c.r for c in CASES}
    assert set(ROUTE_MIXES) == {c.mix for c in CASES}
    assert {"strided", "transposed"} <= {c.layout for c in CASES}
    assert any(len(c.lead) == 2 for c in CASES) and any(c.bad is not None for c in CASES)
    assert repr(layer_cases(30, seed=0)) == repr(CASES[:30]), "the same seed gives the same cases"  # NaN != NaN


@pytest.mark.parametrize("start", range(0, N_CASES, CHUNK))
def test_layer_fuzz(start, one_thread):
    for case in CASES[start : start + CHUNK]:
        check_layer(case, run_layer(case))


def test_the_check_catches_a_wrong_gradient():
    """The bound is tight enough to see a real bug: one gradient entry off by 1% fails."""
    case = next(c for c in CASES if c.dtype == "float32" and c.M > 4 and c.mix == "random" and c.bad is None)
    got = run_layer(case)
    got["dB"] = got["dB"].clone()
    e = int(got["inputs"]["routes"].reshape(-1)[0])
    if e < 0:
        e = int(got["inputs"]["routes"].reshape(-1).max())
    got["dB"][e] *= 1.01
    with pytest.raises(AssertionError, match="dB"):
        check_layer(case, got)
