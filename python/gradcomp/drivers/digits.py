"""The digits task that ``gradcomp demo`` trains and ``gradcomp bench converge`` measures
(its ``mlp`` task): scikit-learn's handwritten digits (1,797 8×8 images, 10 classes, shipped
inside the scikit-learn package: nothing is downloaded) and the MLP that learns them."""

from __future__ import annotations


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): the digits scaled to [0, 1], a fixed 80/20 split."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def make_model(width: int):
    """The MLP 64-width-width-10 with ReLUs (width 1024: 1.1M parameters)."""
    import torch.nn as nn

    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
