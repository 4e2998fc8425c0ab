"""tools/check_layout.py's axis scaling (megaclm.training.layout_check.scale_axes): pure rank math, no processes."""
import pytest

from megaclm.training.layout_check import Axes, scale_axes
from megaclm.utils.errors import UserError


def test_expert_parallel_ranks_may_come_from_the_sequence_split():
    # TP 2 x DP 2 x Ulysses 2, EP 2 = 8 ranks into 4: DP goes to 1, the split's 2 ranks still hold EP 2.
    new, notes = scale_axes(Axes(tp=2, pp=1, dp=2, seq=2, ep=2), 4)
    assert (new.tp, new.dp, new.seq, new.ep, new.world) == (2, 1, 2, 2, 4) and notes == ["dp 2 -> 1 (--max-ranks 4)"]
    # Without a split the EP ranks are data-parallel ranks: DP stays at EP.
    new, _ = scale_axes(Axes(tp=2, pp=1, dp=4, ep=2), 4)
    assert (new.dp, new.world) == (2, 4)
    with pytest.raises(UserError, match="needs 8 ranks at its smallest"):
        scale_axes(Axes(tp=2, pp=2, dp=2, ep=2), 4)
