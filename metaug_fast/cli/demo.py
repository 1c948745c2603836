"""A short, real demonstration of OUCL on sklearn's 8×8 digits (no download): train a small encoder with
two augmented views in label mode, then compare a linear probe on its features with one on a
randomly initialized encoder of the same shape.

    python -m metaug_fast.cli.demo [--epochs 150] [--seed 0] [--backend auto]

Every number printed is measured in this run; the default run takes about 20 s on a 2-core CPU. The full
MetAug trainer (MAG, meta step, memory bank) is a separate module; this demo exercises the loss and its
backends only.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import metaug_fast
from metaug_fast import OUCLLoss
from metaug_fast.cli._parser import Parser


def _views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: a random shift of up to one pixel, pixel dropout and noise; ``[N, 8, 8]`` -> ``[N, 64]``."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]
    x = padded[torch.arange(n)[:, None, None], rows, cols]
    keep = (torch.rand(x.shape, generator=gen) > 0.2).to(x.dtype)
    x = x * keep + 0.1 * torch.randn(x.shape, generator=gen)
    return x.reshape(n, 64)


def _encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))


def _probe_accuracy(encoder: nn.Module, x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        f_train = encoder[:-1](x_train.reshape(len(x_train), 64)).numpy()
        f_test = encoder[:-1](x_test.reshape(len(x_test), 64)).numpy()
    clf = LogisticRegression(max_iter=2000).fit(f_train, y_train.numpy())
    return float((clf.predict(f_test) == y_test.numpy()).mean())


def main(argv=None) -> int:
    ap = Parser("metaug_fast.cli.demo", description="OUCL on sklearn digits: a short, real demo")
    ap.add_argument("--epochs", type=int, default=150, help="training epochs")
    ap.add_argument("--batch", type=int, default=256, help="images per step (two views of each)")
    ap.add_argument("--seed", type=int, default=0, help="the random seed of the split, views and initialization")
    ap.add_argument("--backend", default="auto", help="auto or a backend name (metaug_fast.available_backends())")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch < 2:
        ap.error("--epochs must be >= 1 and --batch >= 2")

    from sklearn.datasets import load_digits
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=gen)
    train, test = perm[:1400], perm[1400:]

    random_encoder = _encoder()
    encoder = _encoder()
    encoder.load_state_dict(random_encoder.state_dict())  # same initialization, then trained
    loss_fn = OUCLLoss(form="weighted", beta=16.0, backend=args.backend)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    print(f"metaug_fast {metaug_fast.__version__}: backends {metaug_fast.available_backends()}, "
          f"using backend={args.backend!r}; digits: {len(train)} train / {len(test)} test images")

    t0 = time.perf_counter()
    bar = tqdm(range(args.epochs), desc="OUCL training", unit="epoch")
    for _ in bar:
        order = train[torch.randperm(len(train), generator=gen)]
        total = 0.0
        for i in range(0, len(order), args.batch):
            xb = x[order[i:i + args.batch]]
            b = len(xb)
            z = encoder(torch.cat([_views(xb, gen), _views(xb, gen)]))
            loss = loss_fn.embeddings(z, torch.arange(b).repeat(2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * b
        bar.set_postfix(loss=f"{total / len(train):.4f}")
    train_s = time.perf_counter() - t0

    acc_random = _probe_accuracy(random_encoder, x[train], y[train], x[test], y[test])
    acc_trained = _probe_accuracy(encoder, x[train], y[train], x[test], y[test])
    print(f"\ntraining: {args.epochs} epochs in {train_s:.1f} s, final OUCL loss {total / len(train):.4f}")
    print("linear-probe top-1 accuracy on the held-out digits (logistic regression on frozen features):")
    print(f"  {'random-init encoder':<24}{100 * acc_random:6.2f} %")
    print(f"  {'OUCL-trained encoder':<24}{100 * acc_trained:6.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
