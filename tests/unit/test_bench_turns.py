"""The order in which the bench's receivers take their turns, round by round."""

from __future__ import annotations

import collections

from bench.__main__ import turns

FOUR = ["DCMTK storescp", "Orthanc", "dicom-ingest", "dicom-ingest, fast path off"]
THREE = ["DCMTK storescp", "dicom-ingest", "dicom-ingest, fast path off"]


def _followers(orders: list[list[str]], first: str) -> collections.Counter[str]:
    """How often each receiver ran right after ``first``."""
    return collections.Counter(order[order.index(first) + 1] for order in orders
                               if order[-1] != first)


def test_four_receivers_take_every_place_once_in_four_rounds() -> None:
    orders = [turns(FOUR, r) for r in range(4)]
    assert orders[0][0] == "DCMTK storescp"
    for order in orders:
        assert sorted(order) == sorted(FOUR)
    for place in range(4):
        assert sorted(order[place] for order in orders) == sorted(FOUR)


def test_each_receiver_runs_right_after_dcmtk_once_in_four_rounds() -> None:
    orders = [turns(FOUR, r) for r in range(4)]
    assert _followers(orders, "DCMTK storescp") == {name: 1 for name in FOUR[1:]}
    for name in FOUR:  # and after every other receiver, too
        assert sorted(_followers(orders, name)) == sorted(set(FOUR) - {name})


def test_three_receivers_are_balanced_over_six_rounds() -> None:
    orders = [turns(THREE, r) for r in range(6)]
    for place in range(3):
        assert collections.Counter(order[place] for order in orders) == {n: 2 for n in THREE}
    assert _followers(orders, "DCMTK storescp") == {name: 2 for name in THREE[1:]}


def test_rounds_beyond_the_design_start_over() -> None:
    assert turns(FOUR, 4) == turns(FOUR, 0)
    assert turns(THREE, 7) == turns(THREE, 1)
    assert turns(["alone"], 3) == ["alone"]
    assert turns([], 2) == []
