"""SpikeGuard: the z-score against the window of accepted losses, runs of spikes, state round trip."""
import math

import pytest

from megaclm.training.spike import SpikeGuard


def test_judges_only_a_full_window_and_upward_jumps():
    g = SpikeGuard(zscore=3.0, window=4)
    for i, loss in enumerate([5.0, 4.8, 4.9, 4.7]):
        assert not g.is_spike(100.0)  # no judgement before the window is full
        g.record(loss, False, i + 1, 16 * i)
    mean, std = 4.85, math.sqrt(sum((x - 4.85) ** 2 for x in [5.0, 4.8, 4.9, 4.7]) / 4)
    assert g.z_of(5.2) == pytest.approx((5.2 - mean) / std)
    assert g.is_spike(mean + 3.1 * std) and not g.is_spike(mean + 2.9 * std) and not g.is_spike(1.0)
    assert not g.is_spike(float("nan"))


def test_runs_of_spikes_and_state_round_trip():
    g = SpikeGuard(zscore=3.0, window=2)
    for i, loss in enumerate([2.0, 2.1]):
        g.record(loss, False, i + 1, 8 * i)
    g.record(50.0, True, 3, 16)
    g.record(60.0, True, 4, 24)
    assert g.consecutive == 2 and [o["first_sample"] for o in g.offending] == [16, 24]
    assert g.losses == [2.0, 2.1]  # spikes never enter the window
    copy = SpikeGuard(zscore=3.0, window=2)
    copy.load_state_dict(g.state_dict())
    assert copy.state_dict() == g.state_dict()
    g.record(float("inf"), False, 5, 32)  # non-finite: left to the NaN counter, the run goes on
    assert g.consecutive == 2
    g.record(2.05, False, 6, 40)
    assert g.consecutive == 0 and g.offending == [] and g.losses == [2.1, 2.05]
