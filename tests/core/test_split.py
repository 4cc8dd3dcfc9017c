import pandas as pd
import pytest

from raysweep.core.errors import UserError
from raysweep.core.split import leave_one_out, sequence_data


def _frame(histories):
    rows = [(u, i) for u, h in enumerate(histories, start=1) for i in h]
    return pd.DataFrame(rows, columns=["user_id", "item_id"])


def test_leave_one_out_and_tensors():
    histories = [[5, 1, 2, 3, 4, 6], [7, 8, 9], [2, 9, 2, 5]]
    split = leave_one_out(_frame(histories))
    assert split.num_users == 3 and split.num_items == 9
    assert [list(split.train(u)) for u in range(3)] == [[5, 1, 2, 3], [7], [2, 9]]
    assert [split.val_target(u) for u in range(3)] == [4, 8, 2]
    assert [split.test_target(u) for u in range(3)] == [6, 9, 5]

    data = sequence_data(split, max_len=3)
    # Training windows: the last L+1 = 4 training items, right-padded.
    assert data.train_windows.tolist() == [[5, 1, 2, 3], [7, 0, 0, 0], [2, 9, 0, 0]]
    assert data.train_lengths.tolist() == [4, 1, 2]
    # Validation input: last L items before the validation target; test input: before the test target.
    assert data.val_history.tolist() == [[1, 2, 3], [7, 0, 0], [2, 9, 0]]
    assert data.test_history.tolist() == [[2, 3, 4], [7, 8, 0], [2, 9, 2]]
    assert data.val_targets.tolist() == [4, 8, 2] and data.test_targets.tolist() == [6, 9, 5]
    # Seen items are the whole history before the target, not just the last L.
    assert data.val_seen_lengths.tolist() == [4, 1, 2] and data.test_seen_lengths.tolist() == [5, 2, 3]
    # Negatives come from items of the training split only (4, 6 and 8 never train).
    assert data.pool_items.tolist() == [1, 2, 3, 5, 7, 9]
    assert data.pool_rank.tolist() == [-1, 0, 1, 2, -1, 3, -1, 4, -1, 5]
    assert data.max_window_items == 4


def test_too_short_user_is_refused():
    with pytest.raises(UserError, match="user 2 has 2 interactions"):
        leave_one_out(_frame([[1, 2, 3], [4, 5]]), "tiny")
