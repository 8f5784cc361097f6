"""Class 9 of issue 24: `moe-runtime profile` measures in interleaved rounds, writes medians, reports the
spread and warns in one line when it is wide. Tested with injected timings, not timed runs."""

from __future__ import annotations

import pytest

from moe_runtime.offload import profile as P


def test_rounds_interleave_the_quantities():
    order = []
    fake = {name: (lambda name=name: (order.append(name), {f"{name}_x": len(order)})[1]) for name in ("a", "b", "c")}
    samples = P.interleaved_rounds(fake, 3)
    assert order == ["a", "b", "c"] * 3  # each round measures each in turn, never a's rounds back to back
    assert samples == {"a_x": [1, 4, 7], "b_x": [2, 5, 8], "c_x": [3, 6, 9]}


def test_median_and_spread_of_injected_rounds():
    med, spread, warning = P.rounds_summary({"bw": [7.0, 7.2, 6.9, 7.1, 7.0], "lat": [10.0, 30.0, 11.0]},
                                            {"bw": "host-to-device GB/s"})
    assert med == {"bw": 7.0, "lat": 11.0}
    assert spread["bw"] == pytest.approx(0.3 / 7.0) and spread["lat"] == pytest.approx(20 / 11)
    assert warning is None  # bandwidth tight; the latency is wide but only reported


def test_a_wide_spread_is_one_warning_line_naming_it():
    # the two back-to-back runs: 0.85 and 7.2 GB/s for the same link
    med, spread, warning = P.rounds_summary({"bw": [0.85, 7.2, 6.9, 7.0, 7.1], "tf": [1.0, 1.0, 1.1]},
                                            {"bw": "host-to-device GB/s", "tf": "TFLOP/s"})
    assert med["bw"] == 7.0  # the median is not dragged down by the slow round
    assert spread["bw"] == pytest.approx((7.2 - 0.85) / 7.0)
    assert warning is not None and "\n" not in warning
    assert "host-to-device GB/s 0.85-7.2 (spread 91%)" in warning and "over 5 rounds" in warning
    assert "TFLOP/s" not in warning  # 10%: below SPREAD_WARN


def test_one_round_and_zero_medians_have_no_spread():
    med, spread, warning = P.rounds_summary({"x": [3.0], "z": [0.0, 0.0]}, {"x": "x", "z": "z"})
    assert spread == {"x": 0.0, "z": 0.0} and warning is None


def test_rounds_flag_is_checked(runtime):
    from .conftest import assert_one_error
    code, _, err = runtime("profile", "--device", "cpu", "--model-config", "mixtral-8x7b", "--rounds", 0)
    assert_one_error(code, err, "moe-runtime", "--rounds")
