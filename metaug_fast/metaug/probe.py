"""Probes of a frozen encoder: the linear probe (two protocols) and a k-nearest-neighbour probe.

Protocols of the linear probe (SGD, lr 0.1, momentum 0.9, batch 256, on conv5 "conv" and fc6 "fc"):

- ``"standard"``: standardized features of un-augmented images, cosine schedule, weight decay 1e-4;
- ``"official"`` (the official code's LinearProbing_MetAug.py): raw features, step decay ×0.2 at 30/40/50
  of 60 epochs (the same fractions of other lengths), no weight decay, the training images augmented
  afresh every epoch, and the features of every encoder followed by each MAG's second hidden layer. The
  official code feeds the MAG a fresh random projection of the fc6/conv5 features on every call; here
  each MAG reads the feature it was trained on, the encoder's output.

The k-NN probe classifies each test image by the 20 training images whose features are most
cosine-similar (centred on the training mean), by majority vote. The few-label probe trains the standard
linear probe on a few labeled images per class. On 8×8 digits a linear probe with every label reaches
98 % on a random encoder's features, and the k-NN probe 95 %; with 3 labels per class the random encoder
falls to about 64 % and trained ones reach 80-85 %: that is the probe ``make train`` reports.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import Views

PROTOCOLS = ("standard", "official")


@torch.no_grad()
def extract(model: nn.Module, data: Views, layer: str, batch: int = 256, device="cpu",
            mags: Optional[Sequence[nn.Module]] = None) -> Tuple[Tensor, Tensor]:
    """Frozen features ``[N, F]`` (on the CPU) and labels ``[N]`` of ``data``'s views; the model runs on
    ``device`` in eval mode. With ``mags``, each MAG's second hidden layer on its view's output follows, the
    MAGs run in the mode they are in (the official probe leaves them in train mode: BatchNorm on each batch's
    statistics)."""
    modules = [model]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    feats, labels = [], []
    for *views, y, _ in DataLoader(data, batch_size=batch, shuffle=False):
        views = [v.to(device) for v in views]
        parts = [model.probe_features(*views, layer=layer)]
        if mags:
            parts += [mag.hidden(z) for mag, z in zip(mags, model(*views))]
        feats.append(torch.cat(parts, 1).cpu())
        labels.append(y)
    for m, mode in zip(modules, modes):
        m.train(mode)
    return torch.cat(feats), torch.cat(labels)


def fit_linear(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_classes: int, *,
               epochs: int = 60, lr: float = 0.1, batch: int = 256, seed: int = 0, protocol: str = "standard",
               train_features: Optional[Callable[[int], Tuple[Tensor, Tensor]]] = None) -> float:
    """Top-1 accuracy (fraction) of a linear classifier trained with SGD (momentum 0.9) under ``protocol``;
    rows labeled -1 (unlabeled data) are ignored. ``train_features(epoch)``, when given, supplies each
    epoch's training features (augmented images) in place of ``x_train``, ``y_train``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    official = protocol == "official"
    mean, std = torch.zeros(()), torch.ones(())
    if not official:
        keep = y_train >= 0
        mean, std = x_train[keep].mean(0), x_train[keep].std(0).clamp(min=1e-6)
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(x_train.shape[1], n_classes)
    with torch.no_grad():
        clf.weight.normal_(0, 0.01, generator=gen)
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0 if official else 1e-4)
    steps = epochs * max(1, -(-len(x_train) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for epoch in range(epochs):
            x, y = train_features(epoch) if train_features else (x_train, y_train)
            keep = y >= 0
            x, y = (x[keep] - mean) / std, y[keep]
            if official:  # ×0.2 after 30, 40 and 50 of 60 epochs
                decays = sum(epoch >= round(epochs * f) for f in (0.5, 2 / 3, 5 / 6))
                for group in opt.param_groups:
                    group["lr"] = lr * 0.2 ** decays
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                loss = nn.functional.cross_entropy(clf(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if not official:
                    sched.step()
    with torch.no_grad():
        return (clf((x_test - mean) / std).argmax(1) == y_test).float().mean().item()


def knn_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, k: int = 20) -> float:
    """Top-1 accuracy (fraction) of a cosine k-NN majority vote on features centred on the training mean."""
    keep = y_train >= 0
    x_train, y_train = x_train[keep], y_train[keep]
    mean = x_train.mean(0)
    a = nn.functional.normalize(x_train - mean, dim=1)
    b = nn.functional.normalize(x_test - mean, dim=1)
    nearest = (b @ a.T).topk(min(k, len(a)), dim=1).indices
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    votes = torch.zeros(len(b), n_classes).scatter_add_(1, y_train[nearest], torch.ones(nearest.shape))
    return (votes.argmax(1) == y_test).float().mean().item()


def few_label_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, n_classes: int, *,
                       per_class: int = 3, draws: int = 5, epochs: int = 100, seed: int = 0) -> float:
    """Mean top-1 accuracy (fraction) of the standard linear probe trained on ``per_class`` labeled images of
    each class, over ``draws`` random draws of those images (the same draws for every encoder of a seed)."""
    accs = []
    for d in range(draws):
        gen = torch.Generator().manual_seed(seed * 1000 + d)
        keep = []
        for c in range(n_classes):
            rows = (y_train == c).nonzero()[:, 0]
            keep.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
        keep = torch.cat(keep)
        accs.append(fit_linear(x_train[keep], y_train[keep], x_test, y_test, n_classes, epochs=epochs, seed=seed + d))
    return sum(accs) / len(accs)


def linear_probe(model: nn.Module, train: Views, test: Views, n_classes: int, *, epochs: int = 60,
                 lr: float = 0.1, seed: int = 0, device="cpu", protocol: str = "standard",
                 mags: Optional[Sequence[nn.Module]] = None, augmented_train: Optional[Views] = None
                 ) -> Dict[str, float]:
    """``{"conv": acc, "fc": acc, "knn": acc}``, top-1 accuracy in percent on the test split: the linear
    probe on each layer under ``protocol`` and the k-NN probe on the fc features.

    ``"official"`` needs ``mags`` (their hidden layers join the features) and ``augmented_train`` (the
    training images with augmentation, drawn afresh every epoch). The global RNG is left as it was (a probe
    mid-training must not change what training does next, or a resumed run would diverge from a straight
    one)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    official = protocol == "official"
    if official and (mags is None or augmented_train is None):
        raise ValueError("protocol='official' needs mags and augmented_train")
    if official:  # the official probe's MAGs stay in train mode; copies, so that training's are untouched
        mags = [copy.deepcopy(mag).train() for mag in mags]
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in ("conv", "fc"):
            feats = dict(layer=layer, device=device, mags=mags if official else None)
            xtr, ytr = extract(model, train, **feats)
            xte, yte = extract(model, test, **feats)
            epoch_feats = (lambda _: extract(model, augmented_train, **feats)) if official else None
            out[layer] = 100.0 * fit_linear(xtr, ytr, xte, yte, n_classes, epochs=epochs, lr=lr, seed=seed,
                                            protocol=protocol, train_features=epoch_feats)
            if layer == "fc":  # on the encoder's features alone (the official ones add the MAGs')
                plain = (xtr, ytr, xte, yte) if not official else \
                    (*extract(model, train, layer="fc", device=device), *extract(model, test, layer="fc",
                                                                                 device=device))
                out["knn"] = 100.0 * knn_accuracy(*plain)
    return out
