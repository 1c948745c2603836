"""Linear probe on a frozen encoder (the paper's protocol: SGD lr 0.1 on conv5 and fc6 features)."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import TwoViews


@torch.no_grad()
def extract(model: nn.Module, data: TwoViews, layer: str, batch: int = 256, device="cpu"):
    """Frozen features ``[N, F]`` (on the CPU) and labels ``[N]`` of the probe's (un-augmented) views;
    the model runs on ``device``."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for v1, v2, y, _ in DataLoader(data, batch_size=batch, shuffle=False):
        feats.append(model.probe_features(v1.to(device), v2.to(device), layer).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def fit_linear(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_classes: int, *,
               epochs: int = 60, lr: float = 0.1, batch: int = 256, seed: int = 0) -> float:
    """Top-1 accuracy (fraction) of a linear classifier on standardized features, trained with SGD
    (momentum 0.9, cosine schedule); rows labeled -1 (unlabeled data) are ignored."""
    keep = y_train >= 0
    x_train, y_train = x_train[keep], y_train[keep]
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(x_train.shape[1], n_classes)
    with torch.no_grad():
        clf.weight.normal_(0, 0.01, generator=gen)
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(x_train) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                loss = nn.functional.cross_entropy(clf(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return (clf(x_test).argmax(1) == y_test).float().mean().item()


def linear_probe(model: nn.Module, train: TwoViews, test: TwoViews, n_classes: int, *, epochs: int = 60,
                 lr: float = 0.1, seed: int = 0, device="cpu") -> Dict[str, float]:
    """``{"conv": acc, "fc": acc}``, top-1 accuracy in percent on the test split.

    The global RNG is left as it was (a probe mid-training must not change what training does next,
    or a resumed run would diverge from a straight one)."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        for layer in ("conv", "fc"):
            xtr, ytr = extract(model, train, layer, device=device)
            xte, yte = extract(model, test, layer, device=device)
            out[layer] = 100.0 * fit_linear(xtr, ytr, xte, yte, n_classes, epochs=epochs, lr=lr, seed=seed)
    return out
