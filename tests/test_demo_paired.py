"""The demo's summary: the exact McNemar p-value of greedy EM before vs after, on the per-question results."""

from routed_lora.demo import _paired, _report
from routed_lora.grpo.evaluate import format_eval


def test_demo_report_prints_the_exact_mcnemar_p_value():
    # 2-hop: 9 questions gained, 1 lost, 10 unchanged; 1-hop: unchanged
    before = [{"hops": 2, "greedy": g} for g in [0] * 9 + [1] + [1] * 5 + [0] * 5] + [{"hops": 1, "greedy": 1}] * 4
    after = [{"hops": 2, "greedy": g} for g in [1] * 9 + [0] + [1] * 5 + [0] * 5] + [{"hops": 1, "greedy": 1}] * 4
    paired = _paired(before, after)
    assert (paired["2hop"]["n01"], paired["2hop"]["n10"]) == (9, 1)
    assert paired["2hop"]["p"] == 22 / 1024 and paired["1hop"]["p"] == 1.0
    ev_b = {"em_greedy/2hop": 0.3, "em_greedy/1hop": 1.0, "em_greedy/all": 0.458, "n/2hop": 20, "n/1hop": 4}
    ev_a = {"em_greedy/2hop": 0.7, "em_greedy/1hop": 1.0, "em_greedy/all": 0.75, "n/2hop": 20, "n/1hop": 4}
    summary = {"paired": paired, "config": {"group_size": 8}, "train_reward_first": 0.5, "train_reward_last": 0.6,
               "timings": {"total_s": 1, "world_s": 0, "sft_s": 0, "grpo_s": 1}}
    text = _report(summary, ev_b, ev_a, format_eval)
    line = [x for x in text.splitlines() if "greedy  2hop" in x][0]
    assert "exact McNemar p = 0.0215" in line and "9 questions gained, 1 lost" in line
