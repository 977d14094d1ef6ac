"""``adapteval.stats.paired_bootstrap`` and the change-vs-base interval in the results tables."""

import pytest

from adapteval.stats import paired_bootstrap
from adapteval.tables import build_results, format_ci, format_score, results_csv, results_markdown


def test_identical_scores_give_a_zero_interval():
    scores = [0.1, 0.5, 0.0, 0.9, 0.3]
    assert paired_bootstrap(scores, scores) == (0.0, 0.0, 0.0)


def test_a_constant_shift_gives_a_point_interval_at_the_shift():
    base = [0.1, 0.4, 0.2, 0.7, 0.0, 0.35]
    method = [score + 0.1 for score in base]
    diff, low, high = paired_bootstrap(base, method)
    assert (diff, low, high) == pytest.approx((0.1, 0.1, 0.1))


def test_a_mixed_change_gives_an_interval_that_straddles_zero():
    # Four rows gain 0.5, four lose 0.5, one gains 0.1: mean +0.1/9, but the rows disagree.
    base = [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.2]
    method = [0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.3]
    diff, low, high = paired_bootstrap(base, method)
    assert diff == pytest.approx(0.1 / 9)
    assert low < 0.0 < high
    assert low >= -0.5 and high <= 0.5


def test_pairing_cancels_what_the_rows_share():
    # The rows differ a lot from each other, but the method adds 0.05 to every other row: the paired interval
    # stays within [0, 0.05] although an unpaired comparison of these spreads could not tell the cells apart.
    base = [0.0, 0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6]
    method = [score + (0.05 if i % 2 == 0 else 0.0) for i, score in enumerate(base)]
    diff, low, high = paired_bootstrap(base, method)
    assert diff == pytest.approx(0.025)
    assert 0.0 <= low < diff < high <= 0.05 + 1e-12


def test_the_interval_is_deterministic_and_narrows_with_confidence():
    base = [0.2, 0.4, 0.1, 0.6, 0.3, 0.5, 0.0, 0.9]
    method = [0.3, 0.3, 0.4, 0.6, 0.2, 0.8, 0.1, 0.9]
    wide = paired_bootstrap(base, method, confidence=0.95)
    assert paired_bootstrap(base, method, confidence=0.95) == wide
    narrow = paired_bootstrap(base, method, confidence=0.5)
    assert wide[1] <= narrow[1] <= narrow[0] <= narrow[2] <= wide[2]


@pytest.mark.parametrize(
    ("base", "method", "kwargs", "message"),
    [
        ([0.1, 0.2], [0.1], {}, "paired rows"),
        ([], [], {}, "at least one row"),
        ([0.1], [0.2], {"n_resamples": 0}, "n_resamples"),
        ([0.1], [0.2], {"confidence": 1.0}, "confidence"),
        ([0.1], [float("nan")], {}, "non-finite"),
    ],
)
def test_bad_inputs_are_refused(base, method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(base, method, **kwargs)


def cell(dataset: str, method: str, per_sample: list[float] | None) -> dict:
    record = {"dataset": dataset, "bench": "domain", "method": method, "metric": "rougeLsum", "n": 4}
    if per_sample is not None:
        record["per_sample"] = per_sample
        record["score"] = sum(per_sample) / len(per_sample)
    else:
        record["score"] = 0.5
    return record


def test_results_carry_the_paired_interval_of_every_non_base_cell():
    cells = [
        cell("geography", "base", [0.1, 0.2, 0.3, 0.4]),
        cell("geography", "tlm", [0.2, 0.3, 0.4, 0.5]),
        cell("geography", "tent", [0.1, 0.2, 0.3]),  # not paired with base: different row counts
        cell("medicine", "base", None),
        cell("medicine", "tlm", [0.2, 0.3, 0.4, 0.5]),  # base has no per-row scores
    ]
    results = build_results(cells)
    rows = {(row["dataset"], row["method"]): row for row in results["cells"]}
    assert rows[("geography", "base")]["diff_vs_base"] is None
    tlm = rows[("geography", "tlm")]
    assert (tlm["diff_vs_base"], tlm["diff_ci_low"], tlm["diff_ci_high"]) == pytest.approx((0.1, 0.1, 0.1))
    assert rows[("geography", "tent")]["diff_ci_low"] is None
    assert rows[("medicine", "tlm")]["diff_ci_high"] is None
    other_rows = build_results([cells[0], {**cells[1], "data_sha256": "another build"}])["cells"][1]
    assert other_rows["diff_vs_base"] is None
    assert results["settings"]["ci"]["confidence"] == 0.95

    header = results_csv(results).splitlines()[0].split(",")
    assert {"diff_vs_base", "diff_ci_low", "diff_ci_high"} <= set(header)

    table = results_markdown(results).splitlines()
    start = table.index("| Bench | Dataset | Metric | n | tlm | tent |")
    assert table[start + 2 :] == [
        "| DomainBench | geography | ROUGE-Lsum | 4 | +0.1000 [+0.1000, +0.1000]* | - |",
        "|  | medicine | ROUGE-Lsum | 4 | - | - |",
    ]


def test_format_ci_marks_intervals_that_exclude_zero():
    keys = ("diff_vs_base", "diff_ci_low", "diff_ci_high")
    assert format_ci(dict(zip(keys, (0.02, -0.01, 0.05)))) == "+0.0200 [-0.0100, +0.0500]"
    assert format_ci(dict(zip(keys, (-0.03, -0.05, -0.01)))) == "-0.0300 [-0.0500, -0.0100]*"
    assert format_ci(dict(zip(keys, (None, None, None)))) == "-"
    assert format_ci(None) == "-"


# ----------------------------------------------------------------------------------------------------------------
# Printing: a non-zero bound never prints as 0, and `*` follows the printed interval
# ----------------------------------------------------------------------------------------------------------------


def ci(diff: float, low: float, high: float) -> dict:
    return {"diff_vs_base": diff, "diff_ci_low": low, "diff_ci_high": high}


def test_a_small_interval_gets_the_decimals_that_show_its_sign():
    # at 4 decimals these print as +0.0000 [+0.0000, +0.0001]*: the lower bound would look like 0
    assert format_ci(ci(0.00004, 0.00001, 0.00008)) == "+0.00004 [+0.00001, +0.00008]*"
    # the bound closest to 0 needs 6 decimals; all three numbers take them
    assert format_ci(ci(-0.00002, -0.00003, -0.000004)) == "-0.000020 [-0.000030, -0.000004]*"
    # wider intervals keep 4 decimals
    assert format_ci(ci(0.1234, 0.0001, 0.2)) == "+0.1234 [+0.0001, +0.2000]*"


def test_the_star_follows_the_printed_bounds():
    # a bound that is 0 even at 6 decimals (the noise of a mean of equal differences) prints as 0: no star
    assert format_ci(ci(0.01, 3e-17, 0.02)) == "+0.0100 [+0.0000, +0.0200]"
    assert format_ci(ci(-0.01, -0.02, -2e-9)) == "-0.0100 [-0.0200, -0.0000]"
    assert format_ci(ci(0.0, -0.0, 0.0)) == "+0.0000 [+0.0000, +0.0000]"


def test_the_percentage_change_of_a_small_difference_is_not_shown_as_zero():
    assert format_score(0.32121, 0.3212, is_base=False) == "0.3212 (+0.003%)"  # 0.00001 / 0.3212 = +0.0031%
    assert format_score(0.3212, 0.3212, is_base=False) == "0.3212 (+0.0%)"  # no change at all


def bpb_cell(method: str, after: list[float], before: list[float], mean: float) -> dict:
    return {
        "dataset": "geography",
        "bench": "domain",
        "method": method,
        "metric": "rougeLsum",
        "score": 0.5,
        "n": 3,
        "answer_bpb": mean,
        "answer_rows": [0, 1, 2],
        "answer_bpb_per_row": after,
        "answer_bpb_base_per_row": before,
    }


def test_bits_per_byte_table_shows_a_small_change_with_its_sign():
    before = [1.0, 1.25, 0.75]  # mean 1.0
    after = [b - 0.00002 for b in before]  # every row 0.00002 bits per byte lower: -0.002%
    cells = [bpb_cell("base", before, before, 1.0), bpb_cell("tlm", after, before, 1.2345)]
    table = results_markdown(build_results(cells)).splitlines()
    start = table.index("## Reference answers, bits per byte (lower is better)")
    # before: "1.2345 (-0.0%) [-0.000, -0.000]*", an interval printed as 0 marked as excluding it
    assert table[start + 6] == "| geography | 3 | 1.0000 | 1.2345 (-0.002%) [-0.00002, -0.00002]* |"


def ppl_cell(method: str, after: float, n_selected: int | None = 2, log_p0: float | None = None) -> dict:
    return {
        "dataset": "geography",
        "bench": "domain",
        "method": method,
        "metric": "rougeLsum",
        "score": 0.5,
        "n": 3,
        "log_ppl_before": 2.0,
        "log_ppl_after": after,
        "n_selected": n_selected,
        "log_p0_used": log_p0,
    }


def test_the_selected_column_is_empty_for_methods_that_train_nothing():
    cells = [
        ppl_cell("base", 2.0, log_p0=3.0),  # stage tlm scores base's prompts and reports whom it would select
        ppl_cell("tlm", 1.5, log_p0=3.0),
        ppl_cell("tt-icl", 2.0),  # its examples go into the prompt only
        ppl_cell("icl", 2.0),
        ppl_cell("fewshot-ttt", 1.8, n_selected=None),
        ppl_cell("my-method", 1.9, n_selected=1),  # not registered: shown as recorded
    ]
    table = results_markdown(build_results(cells)).splitlines()
    start = table.index("| Dataset | Method | scope | scope log-ppl | user-token log-ppl | selected | log P0 |")
    assert table[start + 2 :] == [
        "| geography | base | - | 2.000 → 2.000 | - | - | 3.000 |",
        "| geography | tlm | - | 2.000 → 1.500 | - | 2/3 | 3.000 |",
        "| geography | tt-icl | - | 2.000 → 2.000 | - | - | - |",
        "| geography | icl | - | 2.000 → 2.000 | - | - | - |",
        "| geography | fewshot-ttt | - | 2.000 → 1.800 | - | -/3 | - |",
        "| geography | my-method | - | 2.000 → 1.900 | - | 1/3 | - |",
    ]
