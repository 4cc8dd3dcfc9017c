"""Small datasets with a planted pattern, so tests can tell a model that learns from one that doesn't.

- `chains`: a fixed random permutation f of the items. Each user's history is a walk of
  distinct items that takes the step x -> f(x) half of the time and jumps to a random item
  otherwise; its last three items always form a chain a, f(a), f(f(a)), so the validation
  and test targets are functions of the item just before them. The set of items a user has
  seen says little about the target (its f-preimage, if in the set, is one of ~30 items).
- `shuffled`: the same histories with each user's order shuffled: no order signal left.
- `clusters`: users belong to groups that each own a few items, seen in random order: no
  order signal, but matrix factorisation sees who likes what (the control for BPR-MF).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

USERS, ITEMS, LENGTH = 3000, 300, 30


def _frame(histories: list[np.ndarray]) -> pd.DataFrame:
    users = np.repeat(np.arange(1, len(histories) + 1), [len(h) for h in histories])
    return pd.DataFrame({"user_id": users, "item_id": np.concatenate(histories)})


def _walk(rng: np.random.Generator, successor: np.ndarray) -> np.ndarray:
    while True:
        history = [int(rng.integers(1, ITEMS + 1))]
        while len(history) < LENGTH:
            step = int(successor[history[-1]])
            final_chain = len(history) >= LENGTH - 2  # the last two steps always follow f
            if (final_chain or rng.random() < 0.5) and step not in history:
                history.append(step)
            elif final_chain:
                break  # f would revisit an item: start the walk again
            else:
                history.append(int(rng.choice(np.setdiff1d(np.arange(1, ITEMS + 1), history))))
        if len(history) == LENGTH:
            return np.array(history)


def _chain_histories(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    successor = np.zeros(ITEMS + 1, dtype=np.int64)
    successor[1:] = rng.permutation(ITEMS) + 1
    return [_walk(rng, successor) for _ in range(USERS)]


def chains() -> pd.DataFrame:
    return _frame(_chain_histories())


def shuffled() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return _frame([rng.permutation(h) for h in _chain_histories()])


def clusters(groups: int = 12, items_per_group: int = 10, seen: int = 7, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    histories = []
    for user in range(USERS):
        group = user % groups
        owned = group * items_per_group + 1 + np.arange(items_per_group)
        histories.append(rng.choice(owned, size=seen, replace=False))
    return _frame(histories)
