"""The MetAug objective and one training iteration (SPEC.md section 5).

Scores. Each sample i has two views with original features z1, z2 and augmented features ẑ1 = a_ω1(z1),
ẑ2 = a_ω2(z2) (all ``[B, D]``, L2-normalized). A directed pair (x → y) scores the anchor x_i against its
positive y_i and against K negatives drawn from the memory bank of y's view (the same K indices for every
pair of a step). The original rows use the 2 pairs (z1→z2, z2→z1): ``pos [B,2]``, ``neg [B,2K]``. The
augmented rows use the 6 pairs in which one or both views are augmented (ẑ1→z2, z2→ẑ1, z1→ẑ2, ẑ2→z1,
ẑ1→ẑ2, ẑ2→ẑ1): ``pos [B,6]``, ``neg [B,6K]``, the paper's K⁺ = 6, K⁻ = 6·K.

L(θ, ϑ, ω) = OUCL(original rows) + η·OUCL(augmented rows). Margin statistics σ come from the original
rows and R_σ from the augmented rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

import metaug_fast.functional as MF
from metaug_fast import distributed as D
from metaug_fast import large_batch

from metaug_fast.contract import LossParams

from .bank import MemoryBank

DEFAULTS = LossParams()

METHODS = ("metaug", "oucl", "infonce")


@dataclass
class MetAugConfig:
    """Every hyper-parameter of the official configuration, with the paper's values as defaults."""

    method: str = "metaug"  # "metaug" | "oucl" (only OUCL, no MAG) | "infonce" (the baseline)
    lr: float = 0.03  # encoder SGD
    momentum: float = 0.9
    weight_decay: float = 1e-4
    inner_lr: float = 0.001  # ℓ, the meta step's inner step on θ
    mag_lr: float = 0.03  # ℓ′, MAG SGD
    eta: float = 1e-5  # weight of the augmented OUCL terms
    alpha: float = 1e-11  # weight of R_σ
    k_neg: int = 1024  # negatives sampled from the bank per step (with replacement)
    bank_momentum: float = 0.5
    form: str = DEFAULTS.form
    beta: float = DEFAULTS.beta
    gamma_pos: float = DEFAULTS.gamma_pos
    gamma_neg: float = DEFAULTS.gamma_neg
    margin: float = DEFAULTS.margin
    lam: float = DEFAULTS.lam
    similarity: str = "shifted_cosine"
    temperature: float = 0.07  # InfoNCE baseline (on cosine similarity)
    detach_margin: bool = False
    backend: str = "auto"
    chunk_size: int = 0  # > 0: the encoder step is gradient-cached in chunks of this many samples

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("lr", "inner_lr", "mag_lr", "beta", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("eta", "alpha", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.k_neg < 1:
            raise ValueError(f"k_neg must be >= 1, got {self.k_neg}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: no gradient caching), got {self.chunk_size}")

    def oucl_kwargs(self) -> dict:
        return dict(form=self.form, beta=self.beta, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg,
                    margin=self.margin, lam=self.lam, backend=self.backend)


def _pair_scores(x: Tensor, y: Tensor, negatives: Tensor, similarity: str) -> Tuple[Tensor, Tensor]:
    """d(x_i, y_i) ``[B,1]`` and d(x_i, negatives_ik) ``[B,K]`` for ``negatives [B,K,D]``."""
    pos = (x * y).sum(1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", x, negatives)
    if similarity == "shifted_cosine":
        pos, neg = (1 + pos) / 2, (1 + neg) / 2
    return pos, neg


def _rows(pairs: Sequence[Tuple[Tensor, Tensor, Tensor]], similarity: str) -> Tuple[Tensor, Tensor]:
    scored = [_pair_scores(x, y, negs, similarity) for x, y, negs in pairs]
    return torch.cat([p for p, _ in scored], 1), torch.cat([n for _, n in scored], 1)


def objective(z1: Tensor, z2: Tensor, mags: Sequence[nn.Module], bank: MemoryBank, neg_index: Tensor,
              cfg: MetAugConfig) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L(θ, ϑ, ω) for features ``z1, z2 [B,D]`` and bank indices ``neg_index [B,K]``.

    Returns the loss and the score tensors (``orig_pos``, ``orig_neg`` and, for MetAug, ``aug_pos``,
    ``aug_neg``) that :func:`margin_terms` uses.
    """
    n1, n2 = bank.gather(0, neg_index), bank.gather(1, neg_index)
    sim = "cosine" if cfg.method == "infonce" else cfg.similarity
    orig_pos, orig_neg = _rows([(z1, z2, n2), (z2, z1, n1)], sim)
    scores = {"orig_pos": orig_pos, "orig_neg": orig_neg}
    if cfg.method == "infonce":
        return MF.info_nce(orig_pos, orig_neg, temperature=cfg.temperature), scores
    loss = MF.oucl(orig_pos, orig_neg, **cfg.oucl_kwargs())
    if cfg.method == "metaug":
        a1, a2 = mags[0](z1), mags[1](z2)
        aug_pos, aug_neg = _rows(
            [(a1, z2, n2), (z2, a1, n1), (z1, a2, n2), (a2, z1, n1), (a1, a2, n2), (a2, a1, n1)], sim
        )
        scores.update(aug_pos=aug_pos, aug_neg=aug_neg)
        loss = loss + cfg.eta * MF.oucl(aug_pos, aug_neg, **cfg.oucl_kwargs())
    return loss, scores


def margin_terms(scores: Dict[str, Tensor], cfg: MetAugConfig) -> Tensor:
    """R_σ: σ from the original rows, applied to the augmented rows (SPEC.md section 4)."""
    sigma_pos, sigma_neg = MF.margin_statistics(scores["orig_pos"], scores["orig_neg"], backend=cfg.backend)
    # margin_injection_loss is elementwise PyTorch (reference) on every backend.
    return MF.margin_injection_loss(scores["aug_pos"], scores["aug_neg"], sigma_pos, sigma_neg,
                                    detach_margin=cfg.detach_margin)


def meta_gradient(model: nn.Module, mags: Sequence[nn.Module], bank: MemoryBank, views: Tuple[Tensor, Tensor],
                  neg_index: Tensor, cfg: MetAugConfig) -> Tuple[List[Tensor], Tensor]:
    """∇_ω [L(θ̂, ϑ̂, ω) + α·R_σ] with θ̂ = θ - ℓ·∇_θ L(θ, ϑ, ω), the graph of ∇_θ L kept (second order).

    ``model(v1, v2) -> (z1, z2)`` holds θ and ϑ. Returns the gradients, in the order of
    ``[p for m in mags for p in m.parameters()]``, and the meta objective's value.
    """
    theta = dict(model.named_parameters())
    loss, _ = objective(*functional_call(model, theta, views), mags, bank, neg_index, cfg)
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True, allow_unused=True)
    theta_hat = {k: p if g is None else p - cfg.inner_lr * g for (k, p), g in zip(theta.items(), grads)}
    loss_hat, scores = objective(*functional_call(model, theta_hat, views), mags, bank, neg_index, cfg)
    meta = loss_hat + cfg.alpha * margin_terms(scores, cfg)
    omega = [p for m in mags for p in m.parameters()]
    return list(torch.autograd.grad(meta, omega, allow_unused=False)), meta.detach()


class MetAugStep:
    """One MetAug training iteration: encoder step, meta step, memory-bank update.

    With ``cfg.chunk_size`` smaller than the batch, the encoder step is gradient-cached
    (:func:`metaug_fast.large_batch.cached_backward`): the encoder runs ``chunk_size`` samples at a time and
    its memory no longer grows with the batch; its update equals the plain step's on the same chunks. The
    meta step, a second derivative through the whole encoder that no cache can give exactly, then runs on a
    random sub-batch of ``chunk_size`` samples (the same negatives rows): an unbiased estimate of the
    MAG gradient's batch mean at the memory of one chunk.

    Args:
        model: ``model(v1, v2) -> (z1, z2)``, normalized ``[B, D]`` features (encoder f_θ and head g_ϑ).
        mags: two :class:`MetaFeatureAugmenter` (ignored unless ``cfg.method == "metaug"``).
        bank: the :class:`MemoryBank` (two views).
        data_parallel: the model wrapped in ``DistributedDataParallel`` (whose backward averages θ, ϑ
            gradients over ranks); the encoder step runs through it. With it, the MAG gradients of the meta
            step are averaged over the ranks of ``group`` too, and every rank's features update the bank,
            so the replicated bank, the model and the MAGs stay identical on every rank.
    """

    def __init__(self, model: nn.Module, mags: nn.ModuleList, bank: MemoryBank, cfg: MetAugConfig,
                 data_parallel: Optional[nn.Module] = None, group=None) -> None:
        self.model, self.mags, self.bank, self.cfg = model, mags, bank, cfg
        self.data_parallel, self.group = data_parallel, group
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.mag_opt = torch.optim.SGD(mags.parameters(), lr=cfg.mag_lr)

    def __call__(self, v1: Tensor, v2: Tensor, index: Tensor, generator: torch.Generator) -> Dict[str, float]:
        cfg = self.cfg
        B = v1.shape[0]
        neg_index = self.bank.sample(B, cfg.k_neg, generator)
        cached = 0 < cfg.chunk_size < B

        def loss_of(z1, z2):
            return objective(z1, z2, self.mags, self.bank, neg_index, cfg)[0]

        # 1. Encoder step on L(θ, ϑ, ω) with ω fixed.
        self.opt.zero_grad(set_to_none=True)
        if cached:
            loss, (z1, z2) = large_batch.cached_backward(self.data_parallel or self.model, (v1, v2), loss_of,
                                                         chunk_size=cfg.chunk_size, return_embeddings=True)
        else:
            z1, z2 = (self.data_parallel or self.model)(v1, v2)
            loss = loss_of(z1, z2)
            loss.backward()
        self.opt.step()
        out = {"loss": loss.item()}
        # 2. Meta step on ω through the unrolled encoder step (second order).
        if cfg.method == "metaug":
            views, negatives = (v1, v2), neg_index
            if cached:
                pick = torch.randperm(B, generator=generator)[:cfg.chunk_size].to(v1.device)
                views, negatives = (v1[pick], v2[pick]), neg_index[pick]
            grads, meta = meta_gradient(self.model, self.mags, self.bank, views, negatives, cfg)
            if self.data_parallel is not None:
                grads = self._average(grads)
            self.mag_opt.zero_grad(set_to_none=True)
            for p, g in zip(self.mags.parameters(), grads):
                p.grad = g
            self.mag_opt.step()
            out["meta"] = meta.item()
        # 3. Memory bank: momentum update with this step's (pre-update) features, after scoring.
        if self.data_parallel is not None:
            index, z1, z2 = D.gather_all([index.to(z1.device), z1, z2], self.group)
        self.bank.update(0, index, z1)
        self.bank.update(1, index, z2)
        return out

    def _average(self, grads: List[Tensor]) -> List[Tensor]:
        """The mean over ranks of ``grads`` (one all-reduce of their concatenation)."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= dist.get_world_size(self.group)
        return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "mag_opt": self.mag_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.mag_opt.load_state_dict(state["mag_opt"])
