"""The paper's published figures, as data: every report and benchmark reads them from here.

Source: Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better than
SASRec?", RecSys '23, Tables 1 and 2 (test split, full ranking, seen items removed; training
time in seconds on the authors' hardware). For BPR-MF the "best epoch" column is, most
likely, the number of iterations its search chose for that dataset.

`PAPER_CODE_SECONDS` is not from the paper: it is the paper's own code
(antklen/sasrec-bert4rec-recsys23, commit 29c272e), run on one NVIDIA H100 80GB HBM3 (PyTorch
2.11, CUDA 13) with the paper's settings: seconds per epoch, training + validation. Compare
raysweep's seconds with them only on that card.
"""

from __future__ import annotations

from typing import NamedTuple


class Row(NamedTuple):
    hr10: float
    hr100: float
    ndcg10: float
    ndcg100: float
    seconds: float  # training time
    best_epoch: int


# Table 1: users, items, interactions, average length, density (%).
TABLE1 = {
    "ml-1m": (6_040, 3_416, 999_611, 165.49, 4.85),
    "ml-20m": (138_493, 26_744, 20_000_263, 144.41, 0.54),
    "steam": (281_428, 13_044, 3_488_885, 12.40, 0.10),
    "beauty": (40_226, 54_542, 353_962, 8.79, 0.10),
    "yelp": (279_106, 148_415, 4_350_510, 15.59, 0.11),
}

# Table 2, by dataset and the model's name in the paper.
TABLE2 = {
    "ml-1m": {
        "BPR-MF": Row(0.0762, 0.3656, 0.0383, 0.0936, 1, 60),
        "GRU4Rec": Row(0.2811, 0.6359, 0.1648, 0.2367, 641, 90),
        "BERT4Rec": Row(0.2843, 0.6680, 0.1537, 0.2322, 1409, 197),
        "SASRec": Row(0.2500, 0.6492, 0.1341, 0.2153, 486, 53),
        "SASRec+": Row(0.3152, 0.6743, 0.1821, 0.2555, 540, 63),
        "SASRec+ 3000": Row(0.3159, 0.6808, 0.1857, 0.2603, 769, 85),
    },
    "ml-20m": {
        "BPR-MF": Row(0.0806, 0.3373, 0.0394, 0.0892, 176, 350),
        "GRU4Rec": Row(0.2813, 0.6153, 0.1730, 0.2401, 6319, 30),
        "BERT4Rec": Row(0.2816, 0.6311, 0.1703, 0.2408, 14758, 68),
        "SASRec": Row(0.2001, 0.5932, 0.1067, 0.1851, 2495, 30),
        "SASRec+": Row(0.2983, 0.6397, 0.1833, 0.2521, 9959, 46),
        "SASRec+ 3000": Row(0.3090, 0.6592, 0.1872, 0.2581, 4125, 39),
    },
    "steam": {
        "BPR-MF": Row(0.0431, 0.1767, 0.0223, 0.0480, 10, 370),
        "GRU4Rec": Row(0.1138, 0.3842, 0.0610, 0.1138, 869, 16),
        "BERT4Rec": Row(0.1242, 0.4132, 0.0662, 0.1228, 4893, 74),
        "SASRec": Row(0.0981, 0.3608, 0.0506, 0.1016, 2140, 39),
        "SASRec+": Row(0.1191, 0.3947, 0.0641, 0.1179, 1262, 16),
        "SASRec+ 3000": Row(0.1206, 0.3974, 0.0652, 0.1192, 1226, 14),
    },
    "beauty": {
        "BPR-MF": Row(0.0271, 0.0970, 0.0144, 0.0280, 1, 400),
        "GRU4Rec": Row(0.0291, 0.0933, 0.0163, 0.0288, 644, 25),
        "BERT4Rec": Row(0.0338, 0.1051, 0.0187, 0.0325, 2325, 87),
        "SASRec": Row(0.0246, 0.0939, 0.0126, 0.0262, 521, 26),
        "SASRec+": Row(0.0533, 0.1325, 0.0327, 0.0482, 332, 6),
        "SASRec+ 3000": Row(0.0490, 0.1197, 0.0295, 0.0434, 296, 8),
    },
    "yelp": {
        "BPR-MF": Row(0.0176, 0.0967, 0.0087, 0.0236, 1, 100),
        "GRU4Rec": Row(0.0425, 0.1822, 0.0216, 0.0483, 2677, 5),
        "BERT4Rec": Row(0.0442, 0.1912, 0.0223, 0.0505, 10166, 21),
        "SASRec": Row(0.0228, 0.1067, 0.0115, 0.0274, 655, 3),
        "SASRec+": Row(0.0482, 0.2005, 0.0246, 0.0539, 2505, 3),
        "SASRec+ 3000": Row(0.0462, 0.1929, 0.0237, 0.0519, 1965, 5),
    },
}

# Table 2's columns: raysweep's results.parquet column for each.
COLUMNS = {
    "hr10": "test_hr@10",
    "hr100": "test_hr@100",
    "ndcg10": "test_ndcg@10",
    "ndcg100": "test_ndcg@100",
    "seconds": "train_seconds",
    "best_epoch": "best_epoch",
}

# The paper's claims that a report tests with paired comparisons: (better, worse) as the paper has it.
CLAIMS = [
    ("SASRec+", "BERT4Rec"),
    ("SASRec+ 3000", "BERT4Rec"),
    ("BERT4Rec", "SASRec"),
    ("SASRec+", "SASRec+ 3000"),
    ("GRU4Rec", "BERT4Rec"),
]

# The paper's code on one H100 (see above): train + validation seconds per epoch.
PAPER_CODE_SECONDS = {
    "ml-1m-sasrec+": (1.56, 4.93),
    "beauty-sasrec+": (5.09, 6.76),
    "beauty-sasrec+3000": (8.39, 6.20),
    "beauty-bert4rec": (4.14, 6.41),
    "beauty-gru4rec": (2.77, 8.46),
    "beauty-sasrec-bce": (4.82, 7.38),
}


def paper_row(dataset: str, label: str) -> Row | None:
    """The paper's Table 2 row for a raysweep dataset and model label, if it has one."""
    return TABLE2.get(dataset, {}).get(label)
