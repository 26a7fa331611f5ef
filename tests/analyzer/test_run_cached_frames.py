"""The Run API hands out its cached tables without a second copy (pandas >= 3 copies on write; issue 16:
4 million gradient rows at 100,000 layers), yet a caller's edit never reaches the cache."""

import numpy as np
import pandas as pd

from bbdecoder import analyzer
from helpers import record_tiny


def test_edits_of_returned_frames_do_not_reach_the_cache(tmp_path):
    d = str(tmp_path / "run")
    record_tiny(d, epochs=1, steps_per_epoch=3, weights_every=1)
    run = analyzer.open(d)
    for get in (lambda: run.grad_stats(), lambda: run.grad_stats(per="epoch"), lambda: run.weight_stats()):
        first = get()
        want = first.copy(deep=True)
        assert len(want)
        first["l2"] *= 2.0                          # in place on the column
        first.loc[first.index[0], "l2"] = -1.0      # one cell
        first.iloc[:, first.columns.get_loc("l2")] = 0.0
        first["extra"] = 1
        again = get()
        pd.testing.assert_frame_equal(again, want)
        assert not np.allclose(first["l2"].to_numpy(np.float64), want["l2"].to_numpy(np.float64))
