"""How the bench plans its runs: the order in which its receivers take their turns, round by
round, and the disk space a run needs."""

from __future__ import annotations

import collections

from bench.__main__ import space_needed, turns

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


def test_the_space_a_run_needs_grows_with_what_it_runs() -> None:
    everything = {"receive", "e2e", "memory"}
    full = space_needed(500, 1000, 1024, 4, everything, receivers=4, backlog=20000)
    ct, small = 500 * 512 * 1024, 1000 * 40 * 1024
    # each round of the receive part keeps each load (512 KB over 1, 4 and 16 associations,
    # 40 KB over 1 and 4) once for the disk alone and once for each of 4 receivers, their
    # 200 round trips, and ours' two backlog runs; the backlog's 20000 entries once
    loads = 3 * ct + 2 * small
    receive = space_needed(500, 1000, 1024, 4, {"receive"}, receivers=4, backlog=20000)
    assert receive > (4 * (loads + 4 * (loads + 200 * 512 * 1024) + 2 * ct)
                      + 20000 * 4096)
    no_backlog = space_needed(500, 1000, 1024, 4, {"receive"}, receivers=4, backlog=0)
    assert receive - no_backlog > 4 * 2 * ct
    assert full > receive + 2 * 1024 * 2**20  # the large instance, twice
    assert space_needed(500, 1000, 1024, 8, everything, receivers=4, backlog=20000) > full
    assert space_needed(500, 1000, 1024, 4, everything, receivers=3, backlog=20000) < full
    assert space_needed(500, 1000, 1024, 4, {"e2e"}, receivers=4, backlog=20000) == (
        space_needed(500, 1000, 1024, 4, {"e2e"}, receivers=4))  # backlog runs: receive only
