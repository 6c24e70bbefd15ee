"""Which lanes a worker gives away, without a broker (``lanes.lanes_to_give``)."""

from __future__ import annotations

from types import SimpleNamespace

from dataspace_worker.lanes import give_up, lanes_to_give

OPEN = object()  # stands for an open channel


def _lane(n: int, last_delivery: float, channel=OPEN):
    return SimpleNamespace(lane=n, last_delivery=last_delivery, channel=channel)


def test_a_worker_keeps_its_share_of_the_lanes_it_is_active_on():
    lanes = [_lane(n, 100.0) for n in range(8)]
    active, extra = lanes_to_give(lanes, workers=3, window=10, now=105.0)
    assert len(active) == 8 and [c.lane for c in extra] == [3, 4, 5, 6, 7]  # share 3


def test_lanes_quiet_for_a_window_or_closed_are_not_counted_as_its_own():
    lanes = [_lane(0, 100.0), _lane(1, 80.0), _lane(2, 100.0, channel=None), _lane(3, 104.0)]
    active, extra = lanes_to_give(lanes, workers=2, window=10, now=105.0)
    assert [c.lane for c in active] == [0, 3] and extra == []


def test_alone_it_keeps_every_lane_and_no_count_means_alone():
    lanes = [_lane(n, 100.0) for n in range(4)]
    assert lanes_to_give(lanes, workers=1, window=10, now=101.0)[1] == []
    assert lanes_to_give(lanes, workers=0, window=10, now=101.0)[1] == []


def test_giving_up_a_lane_closes_its_channel_without_a_cancel():
    """Its consumer is marked cancelled for pika, which then sends no basic.cancel:
    the channel's close returns the lane's unacked requests before the next worker
    becomes active (the order holds)."""
    calls = []
    channel = SimpleNamespace(
        is_open=True,
        consumer_tags=["lane-0"],
        _cancelled=set(),
        close=lambda: calls.append("close"),
    )
    lane = _lane(0, 100.0, channel=channel)
    lane.yielding = False
    give_up([lane])
    assert lane.yielding and lane.last_delivery == 0.0
    assert calls == ["close"] and channel._cancelled == {"lane-0"}
