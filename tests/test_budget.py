import pytest

from moe_runtime.core.budget import check_budget, minimum_slots, parse_budget
from moe_runtime.core.errors import MoeError

MB = 17_301_504  # one DeepSeek-V2-Lite expert: 3 x 2048 x 1408 x 2 bytes


@pytest.mark.parametrize("text,slots", [("48", 48), ("25%", 416), ("100%", 1664), ("1GiB", 62),
                                        ("1 GB", 57), ("512MiB", 31), ("1664", 1664),
                                        ("1TiB", 1664)])
def test_parse_budget(text, slots):
    assert parse_budget(text, expert_bytes=MB, total_experts=1664) == slots


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "150%", "-3", "", "1665", "99999"])
def test_parse_budget_rejects(text):
    with pytest.raises(MoeError, match="budget"):
        parse_budget(text, expert_bytes=MB, total_experts=1664)


def test_minimum():
    assert minimum_slots(experts_per_layer=6, max_inflight=4, prefetching=True, scope="global", n_moe_layers=26) == 10
    assert minimum_slots(experts_per_layer=6, max_inflight=4, prefetching=False, scope="per-layer", n_moe_layers=26) == 156


def test_check_budget_names_minimum_in_bytes_and_experts():
    with pytest.raises(MoeError) as e:
        check_budget(7, experts_per_layer=6, max_inflight=4, prefetching=True, scope="global",
                     n_moe_layers=26, expert_bytes=MB)
    msg = str(e.value)
    assert "minimum of 10 experts" in msg and f"{10 * MB:,} bytes" in msg
    check_budget(10, experts_per_layer=6, max_inflight=4, prefetching=True, scope="global",
                 n_moe_layers=26, expert_bytes=MB)


def test_a_count_over_all_experts_is_refused_like_a_share_over_100():
    with pytest.raises(MoeError, match=r"more experts than the model has \(1,664\); give at most 1,664 or 100%"):
        parse_budget("1665", expert_bytes=MB, total_experts=1664)
