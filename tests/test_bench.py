"""Fast tests of the benchmark machinery (routed_lora.bench): FLOP counts, providers agreeing on the same problem,
saved-for-backward accounting, timing statistics, record format, report generation, the CLI, a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from routed_lora.bench import flops as F
from routed_lora.bench.memory import extra_peak_bytes, saved_for_backward
from routed_lora.bench.providers import Case, build, make_problem, make_routes, provider_available
from routed_lora.bench.timing import Timed, paired_ratio, summarize, time_interleaved

CPU_PROVIDERS = ("linear", "routed_torch", "naive", "peft")


# ---------------------------------------------------------------- FLOP counts


def test_flop_counts_by_hand():
    M, K, N, r = 10, 3, 5, 2
    assert F.floor_flops(M, K, N, "forward") == 2 * 10 * 5 * 3 == 300
    assert F.floor_flops(M, K, N, "backward") == 300  # input gradient only: W is frozen
    assert F.floor_flops(M, K, N, "full") == 600
    # 4 routed tokens: shrink 2*4*2*3, expand 2*4*5*2
    assert F.lora_flops(4, K, N, r, "forward") == 2 * 4 * 2 * 3 + 2 * 4 * 5 * 2 == 128
    # backward: G = g B (2mNr), dx += G A (2mrK), dA = G^T x (2mrK), dB = g^T h (2mNr)
    assert F.lora_flops(4, K, N, r, "backward") == 2 * (2 * 4 * 5 * 2) + 2 * (2 * 4 * 2 * 3) == 256
    assert F.lora_flops(4, K, N, r, "full") == 384
    assert F.useful_flops(M, K, N, r, 4, "full") == 600 + 384
    assert F.masked_flops(M, K, N, r, 2, "full") == 600 + F.lora_flops(20, K, N, r, "full")
    with pytest.raises(ValueError, match="mode"):
        F.floor_flops(1, 1, 1, "both")


def test_issue2_lora_share_is_small():
    # DESIGN.md §1: minimal LoRA work is ~5% of the frozen GEMMs at M=4096, K=N=1024, r=16
    share = F.lora_flops(4096, 1024, 1024, 16, "full") / F.floor_flops(4096, 1024, 1024, "full")
    assert 0.04 < share < 0.05


# ---------------------------------------------------------------- problems and providers


def test_make_routes_exact_counts_and_seeded():
    r = make_routes(1000, 0.1, 0.2, seed=3)
    assert r.dtype == torch.int64 and r.shape == (1000,)
    assert int((r == 1).sum()) == 100 and int((r == -1).sum()) == 200 and int((r == 0).sum()) == 700
    assert torch.equal(r, make_routes(1000, 0.1, 0.2, seed=3))
    assert (make_routes(7, 1.0) == 1).all() and (make_routes(7, 0.0) == 0).all()
    with pytest.raises(ValueError, match="tool_frac"):
        make_routes(10, 0.8, 0.5)


@pytest.mark.parametrize("M,K,N,backbone", [(17, 24, 40, 0.0), (33, 16, 8, 0.3), (1, 8, 12, 0.0)])
def test_providers_agree_on_the_same_problem(M, K, N, backbone):
    """Same weights, same routes: every provider gives the same output and the same gradients (float64)."""
    case = Case(M=M, K=K, N=N, r=4, tool_frac=0.4, backbone_frac=backbone, dtype="float64")
    problem = make_problem(case)
    x0 = torch.randn(M, K, dtype=torch.float64)
    g = torch.randn(M, N, dtype=torch.float64)
    results = {}
    for name in CPU_PROVIDERS:
        if not provider_available(name, "cpu")[0]:
            continue
        b = build(name, problem)
        x = x0.clone().requires_grad_(True)
        y = b.forward(x)
        y.backward(g)
        grads = [p.grad for p in b.params]
        if name == "peft":  # per-adapter (r, K) / (N, r) parameters -> stacked (E, r, K), (E, N, r)
            grads = [torch.stack(grads[:2]), torch.stack(grads[2:])]
        results[name] = (y.detach(), x.grad, grads)
    want_y, want_dx, want_g = results["routed_torch"]
    lin = problem.linear
    assert torch.allclose(results["linear"][0], x0 @ lin.weight.t() + lin.bias)
    for name, (y, dx, grads) in results.items():
        if name == "linear":
            continue
        assert torch.allclose(y, want_y, atol=1e-10), f"{name}: output differs by {(y - want_y).abs().max()}"
        assert torch.allclose(dx, want_dx, atol=1e-10), f"{name}: dx differs by {(dx - want_dx).abs().max()}"
        for which, got, want in zip(("dA", "dB"), grads, want_g):
            assert torch.allclose(got.reshape(want.shape), want, atol=1e-10), f"{name}: {which} differs"


def test_routed_triton_needs_cuda():
    ok, why = provider_available("routed_triton", "cpu")
    assert not ok and "CUDA" in why
    with pytest.raises(ValueError, match="provider"):
        provider_available("nope", "cpu")


# ---------------------------------------------------------------- memory


def test_saved_bytes_counts_unique_storages_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)

    def fn():
        a = x * x  # saves x twice (self and other): one storage
        b = a[:, :4] * a[:, :4]  # saves a view of a twice: a's storage once
        return (b @ w[:4]).sum()  # saves w (a parameter: excluded) and b

    _, rep = saved_for_backward(fn, params=[w], inputs=[x])
    assert rep.bytes == 4 * 8 * 4 + 4 * 8 * 4 + 4 * 4 * 4  # x, a, b
    assert rep.excluded_bytes == 8 * 8 * 4
    assert [t[3] for t in rep.tensors].count(True) == 1  # x labelled as the input
    assert rep.largest_numel(inputs=False) == 32


def test_routed_layer_saves_no_MN_tensor_and_meets_issue2_budget():
    """The layer saves x, the routes and an (M, E*r) shrink: never an (M, N) tensor (issue 2's budget)."""
    from routed_lora.bench.suite import saved_budget_bytes

    M, K, N, r, E = 64, 32, 96, 4, 2
    case = Case(M=M, K=K, N=N, r=r, E=E)
    problem = make_problem(case)
    x = torch.randn(M, K, requires_grad=True)
    frozen = [problem.linear.weight, problem.linear.bias]
    reps = {}
    for name in ("linear", "routed_torch"):
        b = build(name, problem)
        _, reps[name] = saved_for_backward(lambda: b.forward(x), params=frozen + b.params, inputs=[x])
    rep = reps["routed_torch"]
    assert rep.largest_numel(inputs=False) < M * N, f"an activation-sized tensor is saved: {rep.tensors}"
    assert not any(tuple(s) == (M, N) for s, *_ in rep.tensors)
    assert rep.bytes <= saved_budget_bytes(case, reps["linear"].bytes), rep.tensors
    assert rep.bytes >= M * K * 4  # x itself is needed for dA


def test_extra_peak_bytes_sees_allocations_cpu():
    def fn():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # another 4 MiB while a is alive
        return float(b[0])

    peak = extra_peak_bytes(fn, "cpu")
    assert 8 << 20 <= peak < 12 << 20


# ---------------------------------------------------------------- timing


def test_summarize_quantiles():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.min, s.mean) == (5, 3.0, 1.0, 3.0)
    assert s.p20 == pytest.approx(1.8) and s.p80 == pytest.approx(4.2)  # numpy's linear interpolation
    d = s.as_dict()
    assert d["median_ms"] == 3000.0 and set(d) >= {"p20_ms", "p80_ms", "n"}


def test_time_interleaved_rotates_and_pairs():
    calls = []
    timed = [Timed(n, run=lambda _, n=n: calls.append(n), prepare=lambda: None) for n in "abc"]
    stats, rounds = time_interleaved(timed, warmup=1, min_repeats=3, max_repeats=3, flush=False)
    assert len(rounds) == 3 and all(set(r) == {"a", "b", "c"} for r in rounds)
    assert calls[3:6] == ["a", "b", "c"] and calls[6:9] == ["b", "c", "a"] and calls[9:12] == ["c", "a", "b"]
    assert stats["a"].n == 3
    pr = paired_ratio([{"a": 2.0, "b": 1.0}, {"a": 6.0, "b": 2.0}, {"a": 4.0, "b": 2.0}], "a", "b")
    assert pr.median == 2.0


# ---------------------------------------------------------------- records, report, CLI


def _tiny_entry(**kw):
    from routed_lora.bench.suite import Entry

    case = Case(M=16, K=32, N=48, r=4, tool_frac=0.5, shape="tiny", **kw)
    return Entry(case, ("forward", "backward", "full"), "tokens", min_repeats=2, budget_s=0.01)


def test_run_entry_records():
    from routed_lora.bench.suite import run_entry

    rows = run_entry(_tiny_entry(), providers=["linear", "routed_torch", "naive"])
    layer = [r for r in rows if r["kind"] == "layer"]
    assert {(r["mode"], r["provider"]) for r in layer} == {
        (m, p) for m in ("forward", "backward", "full") for p in ("linear", "routed_torch", "naive")
    }
    for r in layer:
        for key in ("M", "K", "N", "r", "E", "tool_frac", "dtype", "median_ms", "p20_ms", "p80_ms",
                    "ratio_to_floor", "flops_useful", "tflops", "m_lora"):
            assert key in r, key
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert all(r["ratio_to_floor"] == 1.0 for r in layer if r["provider"] == "linear")
    mem = {r["provider"]: r for r in rows if r["kind"] == "memory"}
    assert mem["linear"]["saved_bytes"] == 0  # the frozen weight is a parameter, not counted
    assert mem["routed_torch"]["saved_within_budget"] and not mem["routed_torch"]["saved_has_MN"]
    json.dumps(rows)  # serialisable


def test_run_suite_tiny_and_report(tmp_path):
    from routed_lora.bench.report import load, markdown
    from routed_lora.bench.suite import machine_info, run_suite

    logs = []
    path = run_suite("cpu", quick=True, out_dir=tmp_path, providers=["linear", "routed_torch", "peft"],
                     entries=[_tiny_entry()], e2e=False, decode=False, log=logs.append)
    rows = load(path)
    info = machine_info("cpu")
    for key in ("device_name", "torch", "git_sha", "routed_lora", "schema"):
        assert rows[0][key] == info[key] if key != "device_name" else rows[0][key]
    assert all(r["run_id"] == rows[0]["run_id"] for r in rows)
    md = (tmp_path / "report.md").read_text()
    assert "| sweep |" in md and "routed_torch" in md and "saved MiB" in md and "Machine:" in md
    assert (tmp_path / "relative_time.png").stat().st_size > 1000
    assert markdown([]) == "No records.\n"


def test_cli_parses_bench_commands():
    from routed_lora.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(["bench", "--quick", "--device", "cpu", "--out", "somewhere"])
    assert a.quick and a.device == "cpu" and a.out == "somewhere" and a.bench_command is None
    b = parser.parse_args(["bench", "compile-report", "--json"])
    assert b.bench_command == "compile-report" and b.json


def test_compile_report_missing_module_is_a_clear_error(monkeypatch, capsys):
    import sys

    from routed_lora.cli import main

    monkeypatch.setitem(sys.modules, "routed_lora.kernels.aot", None)  # import fails
    assert main(["bench", "compile-report", "--json"]) == 2
    assert "routed_lora.kernels.aot is not available" in capsys.readouterr().err


def test_e2e_tiny_models_agree():
    from routed_lora.bench.e2e import E2EConfig, run_e2e

    cfg = E2EConfig(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, vocab=64, batch=2, seq=8, r=4,
                    lora_alpha=8)
    rows = run_e2e("cpu", quick=True, cfg=cfg, budget_s=0.01, min_repeats=2)
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"routed_lora", "peft"}
    assert by["routed_lora"]["first_loss"] == pytest.approx(by["peft"]["first_loss"], rel=1e-5)
    assert by["routed_lora"]["params_trainable"] == by["peft"]["params_trainable"]
    assert all(r["tokens_per_s"] > 0 and r["extra_peak_bytes"] > 0 for r in rows)


def test_breakdown_lists_ops_relative_to_floor():
    from routed_lora.bench.breakdown import breakdown, format_breakdown

    res = breakdown(Case(M=64, K=32, N=48, r=4), "routed_torch", steps=2, warmup=1)
    assert res["floor_ms"] > 0 and res["provider_ms"] > 0
    names = {op[0] for op in res["ops"]}
    # eager calls run the op through its autograd.Function (the custom op is used under torch.compile)
    assert "_RoutedLoRAFunction" in names and "_RoutedLoRAFunctionBackward" in names
    assert "| op |" in format_breakdown(res)


def test_a_failing_provider_is_skipped_not_fatal(monkeypatch, tmp_path):
    from routed_lora.bench import suite
    from routed_lora.bench.report import markdown

    real_build = suite.build

    def flaky(name, problem):
        if name == "naive":
            raise RuntimeError("no kernel for this shape")
        return real_build(name, problem)

    monkeypatch.setattr(suite, "build", flaky)
    rows = suite.run_entry(_tiny_entry(), providers=["linear", "routed_torch", "naive"])
    skipped = [r for r in rows if r["kind"] == "skipped"]
    assert [r["provider"] for r in skipped] == ["naive"] and "no kernel" in skipped[0]["reason"]
    assert {r["provider"] for r in rows if r["kind"] == "layer"} == {"linear", "routed_torch"}
    assert "no kernel for this shape" in markdown(rows)


def test_decode_and_isolation_records_and_tables():
    from routed_lora.bench.decode import run_decode, run_isolation
    from routed_lora.bench.report import decode_table, isolation_table, markdown

    cases = [Case(M=m, K=32, N=48, r=4, shape="tiny") for m in (1, 8)]
    rows = run_decode("cpu", cases=cases, repeats=5)
    assert {(r["M"], r["provider"]) for r in rows} == {(m, p) for m in (1, 8) for p in ("linear", "routed_torch",
                                                                                          "peft")}
    for r in rows:
        assert r["kind"] == "decode" and r["threads"] == 1 and r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["ratio_to_floor"] > 0 and r["ratio_to_peft"] > 0
    iso = run_isolation("cpu", cases=[Case(M=16, K=32, N=48, r=4, shape="tiny")], budget_s=0.01, min_repeats=3)
    assert [r["isolation"] for r in iso] == ["none", "recheck", "sanitize"]
    assert iso[0]["ratio_to_none"] == 1.0
    table = decode_table(rows)
    assert "routed_torch / linear" in table and "routed_torch / peft" in table and table.count("\n") == 3
    assert "| sanitize |" in isolation_table(iso).replace("tiny (32x48) | 16 | float32 ", "")
    assert "Decode (no-grad" in markdown(rows + iso) and "Isolation cost" in markdown(rows + iso)


def test_decode_provider_is_the_no_grad_hot_path(monkeypatch):
    """The routed decode provider runs the layer's decode path (routes set once), not the autograd Function."""
    from routed_lora import ops
    from routed_lora.bench.decode import decode_forward

    problem = make_problem(Case(M=4, K=16, N=8, r=2, shape="tiny"))
    fwd, layer = decode_forward("routed_torch", problem)
    monkeypatch.setattr(ops._RoutedLoRAFunction, "apply", lambda *a: (_ for _ in ()).throw(AssertionError("Function")))
    with torch.no_grad():
        y = fwd(torch.randn(4, 16))
    assert y.shape == (4, 8) and layer._views is not None


def test_queued_cuda_timing_is_per_call(monkeypatch):
    """time_once with queued=n on a GPU: n runs between two events, time per call (events faked here)."""
    from routed_lora.bench import timing

    calls = []

    class FakeEvent:
        t = 0.0

        def __init__(self, enable_timing=True):
            self.at = None

        def record(self):
            self.at = FakeEvent.t

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.at - self.at) * 1e3  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def run(state):
        calls.append(state)
        FakeEvent.t += 0.002  # each call takes 2 ms of device time

    dt = timing.time_once(timing.Timed("x", run=run, prepare=lambda: "s"), torch.device("cuda"), None, queued=10)
    assert dt == pytest.approx(0.002) and calls == ["s"] * 10
    from routed_lora.bench.suite import queued_calls, timing_method

    assert queued_calls("cuda", "full") > 1 and queued_calls("cuda", "backward") == 1 and queued_calls("cpu", "full") == 1
    assert timing_method("cpu", 1) == "cpu_perf_counter" and timing_method("cuda", 20) == "cuda_events_queued_20"


def _graph_model(device="cpu", seed=0):
    import routed_lora as rl

    torch.manual_seed(seed)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8)).to(device)
    for i in (0, 2):
        lin[i] = rl.RoutedLoRALinear.from_linear(lin[i], r=4)
        torch.nn.init.normal_(lin[i].lora_B, std=0.1)
    return lin


def _loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def _batches(n, device="cpu"):
    gen = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(12, 16, generator=gen).to(device), "y": torch.randn(12, 8, generator=gen).to(device),
             "routes": torch.randint(-1, 2, (12,), generator=gen).to(device)} for _ in range(n)]


def test_graphed_train_step_recipe_equals_a_plain_loop_on_cpu():
    """The CUDA-graph recipe's bookkeeping (static copies, routes read through the static tensor, zeroed
    gradients, optimizer) run eagerly (capture=False) gives the plain loop's losses and weights bit for bit."""
    import routed_lora as rl
    from routed_lora.bench.graphs import GraphedTrainStep

    batches = _batches(4)
    ref = _graph_model()
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    want = []
    for b in batches:
        rl.set_routes(ref, b["routes"])
        loss = _loss(ref, b)
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=False)
        want.append(loss.item())
    model = _graph_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = GraphedTrainStep(model, opt, _loss, batches[0], warmup=0, capture=False)
    got = [step(b).item() for b in batches]
    assert got == want
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert model[0]._routes is step.static["routes"]
    with pytest.raises(ValueError, match=r"batch\['x'\]: expected shape \(12, 16\)"):
        step({"x": torch.randn(3, 16)})
    with pytest.raises(ValueError, match="found 2"):
        step({"routes": torch.full((12,), 2)})
    with pytest.raises(ValueError, match="capture: a CUDA graph needs the model on a CUDA device"):
        GraphedTrainStep(model, opt, _loss, batches[0], capture=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graphed_train_step_on_gpu_matches_eager(backend):
    """The recipe on a GPU: captured once, replayed per batch; the losses and weights of an eager loop."""
    import routed_lora as rl
    from routed_lora.bench.graphs import GraphedTrainStep, graph_time
    from routed_lora.bench.providers import use_backend

    if backend == "triton" and not rl.backend.triton_available():
        pytest.skip("Triton kernels not importable")
    with use_backend(backend):
        batches = _batches(5, "cuda")
        models = [_graph_model("cuda"), _graph_model("cuda")]
        opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, capturable=True)
                for m in models]
        step = GraphedTrainStep(models[0], opts[0], _loss, batches[0], warmup=2)
        assert step.graph is not None
        eager = GraphedTrainStep(models[1], opts[1], _loss, batches[0], warmup=2, capture=False)
        for b in batches:
            torch.testing.assert_close(step(b).clone(), eager(b).clone(), rtol=1e-5, atol=1e-6)
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        x = torch.randn(64, 16, device="cuda")
        times = graph_time(lambda: models[0](x), n=5, repeats=2)
        assert len(times) == 2 and all(t > 0 for t in times)


def test_pytest_benchmark_items_are_the_suite_plan():
    """One definition: the pytest-benchmark items are exactly the suite's layer entries x modes x providers, its
    decode and isolation cases and the e2e step, on CPU and on CUDA (collected everywhere, skipped without it)."""
    from routed_lora.bench.decode import DECODE_PROVIDERS, decode_cases, isolation_cases
    from routed_lora.bench.items import benchmark_items
    from routed_lora.bench.providers import PROVIDERS
    from routed_lora.bench.suite import plan

    for device in ("cpu", "cuda"):
        for quick in (True, False):
            items = benchmark_items(device, quick)
            layer = {(i.info["M"], i.info["K"], i.info["N"], i.info["r"], i.info["tool_frac"], i.info["sweep"],
                      i.info["mode"], i.provider) for i in items if i.kind == "layer"}
            want = {(e.case.M, e.case.K, e.case.N, e.case.r, e.case.tool_frac, e.sweep, m, p)
                    for e in plan(device, quick) for m in e.modes for p in PROVIDERS}
            assert layer == want
            dec = {(i.info["M"], i.provider) for i in items if i.kind == "decode"}
            assert dec == {(c.M, p) for c in decode_cases(device, quick) for p in DECODE_PROVIDERS}
            assert {i.info["M"] for i in items if i.kind == "isolation"} == {c.M for c in isolation_cases(device, quick)}
            assert {i.provider for i in items if i.kind == "e2e"} == {"routed_lora", "peft"}
            assert len({i.id for i in items}) == len(items), "pytest ids must be unique"
    cuda = benchmark_items("cuda", True)
    if not torch.cuda.is_available():
        assert all(i.available() == (False, "no CUDA device") for i in cuda)


def test_pytest_benchmark_item_runs(one_thread):
    from routed_lora.bench.items import benchmark_items

    items = benchmark_items("cpu", True, kinds=("layer", "decode"), providers=("linear", "routed_torch"))
    small = [i for i in items if i.info["M"] == 1 and i.info.get("mode") in ("full", "forward_nograd")]
    assert {i.kind for i in small} == {"layer", "decode"}
    for item in small:
        prep = item.prepare()
        assert prep.timing == "cpu_perf_counter" and prep.rounds >= 5
        args, kwargs = prep.setup() if prep.setup else ((), {})
        prep.target(*args, **kwargs)


def test_gpu_targets_script_self_test_runs_end_to_end(tmp_path):
    """benchmarks/gpu_targets.py is the one call a lent GPU machine makes: its --cpu self-test (tiny shapes,
    Triton interpreter) must run every section and write a complete JSON and table, so that a GPU session
    spends its minutes measuring, not debugging the script. The ratios themselves mean nothing on a CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    pytest.importorskip("peft")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_targets.py"), "--cpu", "--out",
                          str(tmp_path), "--docs", "", "--repeats", "1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_targets.json").read_text())
    assert out["complete"] and not out["errors"] and not out["variant_errors"], out["errors"]
    assert len(out["targets"]) == 9 and all(isinstance(t["value"], float) for t in out["targets"])
    assert not [r for r in out["rows"] if "error" in r]
    assert "| target |" in (tmp_path / "gpu_targets.md").read_text()


@pytest.mark.parametrize("script", ["gpu_profile.py", "gpu_overhead.py"])
def test_gpu_full_mode_scripts_self_test(tmp_path, script):
    """The scripts gpu_all.sh adds with FULL=1 run their --cpu self-test without an error."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--cpu", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip(), "the self-test printed nothing"


def test_vllm_rollout_ratios_are_per_round_throughput_ratios():
    """benchmarks/vllm_rollout.py's target row: throughput ratios paired round by round (not ratios of medians)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_rollout.py"
    spec = importlib.util.spec_from_file_location("vllm_rollout_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports no vLLM at module level
    res = {"vllm_routed": [(1.0, {}), (2.0, {}), (1.0, {})], "vllm_one_lora_our_op": [(0.98, {}), (1.9, {}), (1.0, {})],
           "vllm_no_lora": [(0.9, {}), (1.0, {}), (0.7, {})]}
    r = mod._ratios(res)
    over = r["vllm_routed/vllm_one_lora_our_op"]  # 0.98, 0.95, 1.0 -> median 0.98: overhead 2%, met
    assert over["median"] == pytest.approx(0.98) and over["min"] == pytest.approx(0.95) and over["met"] is True
    nolora = r["vllm_routed/vllm_no_lora"]  # 0.9, 0.5, 0.7 -> median 0.7 < 0.8 (a ratio of medians gives 0.9)
    assert nolora["median"] == pytest.approx(0.7) and nolora["met"] is False
    assert "vllm_routed/hf" not in r and "vllm_routed_vllm_ops/vllm_one_lora" not in r
