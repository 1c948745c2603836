"""The MetAug objective and one training iteration, in two formulations.

``objective="features"`` (this library's default). Each sample has two views with original features z1, z2
and augmented features ẑ1 = a_ω1(z1), ẑ2 = a_ω2(z2) (all ``[B, D]``, L2-normalized). A directed pair
(x → y) scores the anchor x_i against its positive y_i and against K negatives drawn from the memory bank
of y's view (the same K indices for every pair of a step). The original rows use the 2 pairs (z1→z2,
z2→z1): ``pos [B,2]``, ``neg [B,2K]``. The augmented rows use the 6 pairs in which one or both views are
augmented (ẑ1→z2, z2→ẑ1, z1→ẑ2, ẑ2→z1, ẑ1→ẑ2, ẑ2→ẑ1): ``pos [B,6]``, ``neg [B,6K]``, the paper's K⁺ = 6,
K⁻ = 6·K. L(θ, ϑ, ω) = OUCL(original rows) + η·OUCL(augmented rows).

``objective="memory"`` (the official code's CMC-style memory, :meth:`MetAugConfig.official`). V views (2 or
3: L, ab and, with three, Lab). One *memory call* scores anchors ``x_v [B, D]`` (one per view) against the
bank: for every directed pair (a → b) of views, the positive of x_a[i] is bank_b[index_i], the other view's
bank row at the sample's own index (detached), and its K negatives are bank_b rows drawn afresh for that
call. The six pairs of three views, in the official order, are ab→l, l→ab, Lab→l, l→Lab, ab→Lab, Lab→ab.

    L = s·C(call(z)) + η·s·Σ_v C(call(z with z_v replaced by ẑ_v)) + η·s·C(call(ẑ)) [+ α·R_σ]

where C is OUCL over the call's rows and s is ``loss_scale``. Augmented features enter only as anchors.

``objective="batch"`` (this library's, for large batches): in-batch negatives in label mode, no memory
bank. With X = [z1; z2] and labels the samples' indices twice, each row's positive is its other view and its
negatives are both views of every other sample of the batch; the augmented term takes X̂ = [z1; z2; ẑ1; ẑ2],
where each row's positives are its sample's three other views (the six pairs of the features objective and
the two pairs of a view with its own augmentation). L = C(X) + η·C(X̂), C the label-mode OUCL (or InfoNCE)
over the **global** batch under torch.distributed (``cfg.distributed``: gathered, or around the ring), so
the meta step's second derivative crosses the ranks (:func:`batch_objective`).

In all, margin statistics σ come from original-feature scores and R_σ from the augmented rows (see
:func:`margin_terms`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

import metaug_fast.functional as MF
from metaug_fast import distributed as D
from metaug_fast import large_batch
from metaug_fast.contract import LossParams

from .bank import BANK_INITS, MemoryBank

DEFAULTS = LossParams()

METHODS = ("metaug", "oucl", "infonce")
OBJECTIVES = ("features", "memory", "batch")
DISTRIBUTED = ("all_gather", "ring")
BANK_WRITES = ("after_step", "every_scoring")
MARGIN_IN = ("meta", "all")
VARIANTS = ("metaug", "metaug2", "first_upload", "lookahead")
SIDE_EFFECTS = ("none", "all", "bank_writes", "batchnorm")
# The variants whose iteration ends with the look-ahead encoder update, and those whose MAGs take the
# update through ω̂ = ω − ℓ·∇_ω L (train_MetAug2.py's step 2b).
LOOKAHEAD_VARIANTS = ("metaug2", "first_upload", "lookahead")
MAG_LOOKAHEAD_VARIANTS = ("metaug2", "first_upload")

# (anchor view, bank view) of a memory call, in the official order: ab→l, l→ab, Lab→l, l→Lab, ab→Lab, Lab→ab.
MEMORY_PAIRS = ((1, 0), (0, 1), (2, 0), (0, 2), (1, 2), (2, 1))

Writer = Optional[Callable[[Sequence[Tensor]], None]]


@dataclass
class MetAugConfig:
    """Every hyper-parameter of the MetAug step. The defaults are this library's formulation (the paper's
    loss, ``objective="features"``); :meth:`official` gives the official code's configuration.

    Example:
        >>> from metaug_fast.metaug import MetAugConfig
        >>> MetAugConfig().objective, MetAugConfig.official().objective, MetAugConfig.official(eta=1.0).eta
        ('features', 'memory', 1.0)
    """

    method: str = "metaug"  # "metaug" | "oucl" (only OUCL, no MAG) | "infonce" (the baseline)
    lr: float = 0.03  # encoder SGD
    momentum: float = 0.9
    weight_decay: float = 1e-4
    inner_lr: float = 0.001  # ℓ, the meta step's inner step on θ
    mag_lr: float = 0.03  # ℓ′, MAG SGD
    mag_momentum: float = 0.0
    mag_weight_decay: float = 0.0
    eta: float = 1e-5  # weight of the augmented OUCL terms
    alpha: float = 1e-11  # weight of R_σ
    margin_pos_weight: float = 1.0  # the weight of R_σ's positive half (official: 1e-4)
    margin_in: str = "meta"  # "meta": R_σ in the meta objective only; "all": in the encoder's loss too
    k_neg: int = 1024  # negatives sampled from the bank per step ("features") or per call ("memory")
    bank_momentum: float = 0.5
    bank_init: str = "normal"  # or "uniform", the official code's (see MemoryBank)
    objective: str = "features"
    bank_writes: str = "after_step"  # or "every_scoring": after every scoring of the original features
    loss_scale: float = 1.0  # s: the official criterion is 16·ℓ (β·ℓ at β = 16)
    variant: str = "metaug"  # "metaug2", "first_upload", "lookahead": see MetAugStep
    # "oucl" only, MetAug's side effects without a MAG: "all" (its extra BatchNorm forwards and bank writes),
    # "bank_writes" (the writes alone) or "batchnorm" (the forwards' running statistics alone)
    matched_side_effects: str = "none"
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
    # objective="batch" under torch.distributed: the global batch gathered on every rank, or around the ring
    distributed: str = "all_gather"

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("objective", OBJECTIVES), ("bank_writes", BANK_WRITES),
                              ("margin_in", MARGIN_IN), ("variant", VARIANTS),
                              ("bank_init", BANK_INITS), ("matched_side_effects", SIDE_EFFECTS),
                              ("distributed", DISTRIBUTED)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("lr", "inner_lr", "mag_lr", "beta", "temperature", "loss_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("eta", "alpha", "weight_decay", "momentum", "mag_momentum", "mag_weight_decay",
                     "margin_pos_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.k_neg < 1:
            raise ValueError(f"k_neg must be >= 1, got {self.k_neg}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: no gradient caching), got {self.chunk_size}")
        if self.matched_side_effects != "none" and self.method != "oucl":
            raise ValueError("matched_side_effects is the only-OUCL control: it needs method='oucl', "
                             f"got {self.method!r}")
        if self.variant != "metaug" and self.method != "metaug":
            raise ValueError(f"variant={self.variant!r} changes the MAG update: it needs method='metaug'")
        if self.chunk_size and (self.objective != "features" or self.bank_writes != "after_step"
                                or self.variant != "metaug" or self.matched_side_effects != "none"):
            raise ValueError("chunk_size (gradient caching) supports objective='features', "
                             "bank_writes='after_step', variant='metaug' without matched_side_effects")

        if self.objective == "batch" and self.bank_writes != "after_step":
            raise ValueError("objective='batch' takes its negatives from the batch and writes no bank: "
                             f"bank_writes must be 'after_step', got {self.bank_writes!r}")
        if self.distributed == "ring" and self.method == "infonce":
            raise ValueError("distributed='ring' scores OUCL; the InfoNCE baseline takes distributed='all_gather'")

    @classmethod
    def official(cls, **overrides) -> "MetAugConfig":
        """The configuration of the official code (github.com/jiangmengli/metaug, train_MetAug.py), with
        ``overrides`` applied: the CMC-style memory objective, the criterion at its own scale (16·ℓ of the
        weighted form, β = 16, on (s + 1)/2), the MAG optimizer with momentum 0.9 and weight decay 1e-4,
        R_σ (α = 1e-11, its positive half × 1e-4) in every loss, the bank written on every scoring of the
        original features (three times per iteration)."""
        base = dict(method="metaug", lr=0.03, momentum=0.9, weight_decay=1e-4, inner_lr=0.001, mag_lr=0.03,
                    mag_momentum=0.9, mag_weight_decay=1e-4, eta=1e-5, alpha=1e-11, margin_pos_weight=1e-4,
                    margin_in="all", k_neg=1024, bank_momentum=0.5, bank_init="uniform", objective="memory",
                    bank_writes="every_scoring", loss_scale=16.0, variant="metaug", form="weighted", beta=16.0,
                    gamma_pos=0.0, gamma_neg=0.0, similarity="shifted_cosine")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown MetAugConfig fields: {sorted(unknown)}")
        return cls(**{**base, **overrides})

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


def _cat(scored: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """(pos, neg) pairs side by side: ``pos [B, ΣK⁺]``, ``neg [B, ΣK⁻]``."""
    return torch.cat([p for p, _ in scored], 1), torch.cat([n for _, n in scored], 1)


def _rows(pairs: Sequence[Tuple[Tensor, Tensor, Tensor]], similarity: str) -> Tuple[Tensor, Tensor]:
    return _cat([_pair_scores(x, y, negs, similarity) for x, y, negs in pairs])


def _criterion(pos: Tensor, neg: Tensor, cfg: MetAugConfig) -> Tensor:
    if cfg.method == "infonce":
        return MF.info_nce(pos, neg, temperature=cfg.temperature)
    return cfg.loss_scale * MF.oucl(pos, neg, **cfg.oucl_kwargs())


def _similarity(cfg: MetAugConfig) -> str:
    return "cosine" if cfg.method == "infonce" else cfg.similarity


def _with_margin(loss: Tensor, scores: Dict[str, Tensor], cfg: MetAugConfig, place: str) -> Tensor:
    """``loss`` + α·R_σ when ``cfg.margin_in`` puts R_σ at ``place``: ``"all"`` (every loss, added by the
    objectives) or ``"meta"`` (the meta objective only, added by the meta step)."""
    if cfg.method == "metaug" and cfg.margin_in == place:
        return loss + cfg.alpha * margin_terms(scores, cfg)
    return loss


def objective(z1: Tensor, z2: Tensor, mags: Sequence[nn.Module], bank: MemoryBank, neg_index: Tensor,
              cfg: MetAugConfig, write: Writer = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L(θ, ϑ, ω) of the ``"features"`` formulation for ``z1, z2 [B,D]`` and bank indices ``neg_index [B,K]``.

    ``write(zs)``, when given, is called once the original rows are scored (``bank_writes="every_scoring"``).
    Returns the loss and the score tensors (``orig_pos``, ``orig_neg`` and, for MetAug, ``aug_pos``,
    ``aug_neg``) that :func:`margin_terms` uses.
    """
    n1, n2 = bank.gather(0, neg_index), bank.gather(1, neg_index)
    sim = _similarity(cfg)
    orig_pos, orig_neg = _rows([(z1, z2, n2), (z2, z1, n1)], sim)
    if write is not None:
        write((z1, z2))
    scores = {"orig_pos": orig_pos, "orig_neg": orig_neg}
    loss = _criterion(orig_pos, orig_neg, cfg)
    if cfg.method == "metaug":
        a1, a2 = mags[0](z1), mags[1](z2)
        aug_pos, aug_neg = _rows(
            [(a1, z2, n2), (z2, a1, n1), (z1, a2, n2), (a2, z1, n1), (a1, a2, n2), (a2, a1, n1)], sim
        )
        scores.update(aug_pos=aug_pos, aug_neg=aug_neg)
        loss = loss + cfg.eta * _criterion(aug_pos, aug_neg, cfg)
    return _with_margin(loss, scores, cfg, "all"), scores


def _in_batch_scores(anchors: Tensor, ref: Tensor, self_start: int, batch: int,
                     similarity: str) -> Tuple[Tensor, Tensor]:
    """Score-mode rows of in-batch anchors: ``anchors [Va·B, D]`` and ``ref [Vr·B, D]`` hold views of the
    same B samples (row v·B + i: sample i), the anchors are ref's rows from ``self_start`` on. Returns each
    anchor's positives (its sample's other rows of ref, ``[Va·B, Vr - 1]``) and negatives (every other
    sample's, ``[Va·B, Vr·(B - 1)]``); every row has as many, so they are dense."""
    rows, cols = torch.arange(anchors.shape[0]), torch.arange(ref.shape[0])
    same = (rows % batch)[:, None] == (cols % batch)[None, :]
    own = cols[None, :] == rows[:, None] + self_start
    scores = anchors @ ref.T
    if similarity == "shifted_cosine":
        scores = (1 + scores) / 2
    n = anchors.shape[0]
    return scores[same & ~own].view(n, -1), scores[~same].view(n, -1)


def _label_criterion(emb: Tensor, labels: Tensor, cfg: MetAugConfig, group, distributed: bool) -> Tensor:
    """C over the rows ``emb [N, D]`` with labels ``[N]``: label-mode OUCL (or InfoNCE) over this process's
    rows, or under torch.distributed over every rank's (``cfg.distributed``). Distributed, its value is the
    global loss and its gradient W times this rank's share of the global gradient: averaged over the W
    ranks (DistributedDataParallel, the MAG gradients) the shares add up to the global gradient."""
    if cfg.method == "infonce":
        if distributed:
            loss = D.info_nce_embeddings_all_gather(emb, labels, temperature=cfg.temperature, group=group,
                                                    backend=cfg.backend)
        else:
            loss = MF.info_nce_embeddings(emb, labels, temperature=cfg.temperature, backend=cfg.backend)
    elif distributed:
        gather = D.oucl_embeddings_ring if cfg.distributed == "ring" else D.oucl_embeddings_all_gather
        loss = cfg.loss_scale * gather(emb, labels, group=group, similarity=cfg.similarity, **cfg.oucl_kwargs())
    else:
        loss = cfg.loss_scale * MF.oucl_embeddings(emb, labels, similarity=cfg.similarity, **cfg.oucl_kwargs())
    if not distributed:
        return loss
    world = dist.get_world_size(group)
    return world * loss - (world - 1) * loss.detach()


def batch_objective(z1: Tensor, z2: Tensor, mags: Sequence[nn.Module], index: Tensor, cfg: MetAugConfig,
                    group=None, distributed: bool = False) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L of the ``"batch"`` formulation for ``z1, z2 [B, D]`` of the samples ``index [B]`` (their labels;
    distinct over the ranks). C reaches every rank's rows when ``distributed``; R_σ, a regularizer per
    sample, is taken over this rank's rows (σ from the original rows' in-batch scores). Returns the loss
    and, for MetAug, the score tensors of :func:`margin_terms`."""
    x, labels = torch.cat([z1, z2]), torch.cat([index, index])
    loss = _label_criterion(x, labels, cfg, group, distributed)
    scores: Dict[str, Tensor] = {}
    if cfg.method == "metaug":
        a = torch.cat([mags[0](z1), mags[1](z2)])
        x_hat = torch.cat([x, a])
        loss = loss + cfg.eta * _label_criterion(x_hat, torch.cat([labels, labels]), cfg, group, distributed)
        sim, batch = _similarity(cfg), z1.shape[0]
        scores["orig_pos"], scores["orig_neg"] = _in_batch_scores(x, x, 0, batch, sim)
        scores["aug_pos"], scores["aug_neg"] = _in_batch_scores(a, x_hat, x.shape[0], batch, sim)
    return _with_margin(loss, scores, cfg, "all"), scores


def memory_call(anchors: Sequence[Tensor], bank: MemoryBank, index: Tensor, k_neg: int,
                generator: Optional[torch.Generator], similarity: str) -> Dict[Tuple[int, int], Tuple[Tensor, Tensor]]:
    """One CMC memory call: ``{(a, b): (pos [B,1], neg [B,K])}`` for every pair of :data:`MEMORY_PAIRS`
    within ``len(anchors)`` views. The K negatives (one draw of ``[B, K]`` indices) are shared by the pairs
    of this call and drawn afresh by the next."""
    views = len(anchors)
    neg_index = bank.sample(anchors[0].shape[0], k_neg, generator)
    own = [bank.gather(v, index) for v in range(views)]
    negs = [bank.gather(v, neg_index) for v in range(views)]
    return {(a, b): _pair_scores(anchors[a], own[b], negs[b], similarity)
            for a, b in MEMORY_PAIRS if a < views and b < views}


def memory_objective(zs: Sequence[Tensor], mags: Sequence[nn.Module], bank: MemoryBank, index: Tensor,
                     cfg: MetAugConfig, generator: Optional[torch.Generator],
                     write: Writer = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """L of the ``"memory"`` formulation (the official code's) for features ``zs``, V × ``[B, D]``, of the
    samples ``index [B]``.

    The calls are made in the official order: the original features (then ``write(zs)``, when given), each
    view augmented in turn, all views augmented. The margin statistics σ take, for every pair, the original
    scores of the last call that left both of its views original (the official code reuses its variable
    names that way); R_σ takes the pairs that involve the augmented view of the per-view calls.
    """
    sim = _similarity(cfg)
    orig = memory_call(zs, bank, index, cfg.k_neg, generator, sim)
    if write is not None:
        write(zs)
    orig_pos, orig_neg = _cat(list(orig.values()))
    loss = _criterion(orig_pos, orig_neg, cfg)
    scores = {"orig_pos": orig_pos, "orig_neg": orig_neg}
    if cfg.method != "metaug":
        return loss, scores
    augs = [mag(z) for mag, z in zip(mags, zs)]
    latest, involved = dict(orig), []
    for v in range(len(zs)):
        out = memory_call([augs[u] if u == v else zs[u] for u in range(len(zs))], bank, index, cfg.k_neg,
                          generator, sim)
        loss = loss + cfg.eta * _criterion(*_cat(list(out.values())), cfg)
        for pair, scored in out.items():
            if v in pair:
                involved.append(scored)
            else:
                latest[pair] = scored
    out = memory_call(augs, bank, index, cfg.k_neg, generator, sim)
    loss = loss + cfg.eta * _criterion(*_cat(list(out.values())), cfg)
    scores["orig_pos"], scores["orig_neg"] = _cat(list(latest.values()))
    scores["aug_pos"], scores["aug_neg"] = _cat(involved)
    return _with_margin(loss, scores, cfg, "all"), scores


def margin_terms(scores: Dict[str, Tensor], cfg: MetAugConfig) -> Tensor:
    """R_σ: σ from ``orig_pos``/``orig_neg``, applied to ``aug_pos``/``aug_neg``, the positive half weighted by
    ``cfg.margin_pos_weight``."""
    sigma_pos, sigma_neg = MF.margin_statistics(scores["orig_pos"], scores["orig_neg"], backend=cfg.backend)
    args = (scores["aug_pos"], scores["aug_neg"], sigma_pos, sigma_neg)
    # margin_injection_loss is elementwise PyTorch (reference) on every backend.
    if cfg.margin_pos_weight == 1.0:
        return MF.margin_injection_loss(*args, detach_margin=cfg.detach_margin)
    # Each half alone: a row whose entries are all masked out contributes 0 to that half.
    no_pos = torch.zeros_like(scores["aug_pos"], dtype=torch.bool)
    no_neg = torch.zeros_like(scores["aug_neg"], dtype=torch.bool)
    pos_half = MF.margin_injection_loss(*args, detach_margin=cfg.detach_margin, neg_mask=no_neg)
    neg_half = MF.margin_injection_loss(*args, detach_margin=cfg.detach_margin, pos_mask=no_pos)
    return cfg.margin_pos_weight * pos_half + neg_half


def _virtual(model: nn.Module, params: Dict[str, Tensor], views: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """``model`` at virtual parameters: BatchNorm uses the batch's statistics and its running statistics are
    left as they are (the official code's fast-weight forward does the same)."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return functional_call(model, {**params, **buffers}, tuple(views))


def lookahead_gradient(model: nn.Module, views: Sequence[Tensor], inner: Callable, outer: Callable,
                       inner_lr: float, wrt: Sequence[Tensor], create_graph: bool = True,
                       reduce: Optional[Callable[[List[Tensor]], List[Tensor]]] = None) -> Tuple[List[Tensor], Tensor]:
    """∇_wrt L̂ with L̂ = ``outer(model at θ̂)``, θ̂ = θ - ℓ·∇_θ ``inner(model(views))`` (graph kept when
    ``create_graph``: second order). ``inner(zs)`` and ``outer(zs)`` map the features to a scalar loss (the
    meta objective is ``outer``); ``reduce`` (differentiable) maps the gradients ∇_θ to the ones θ̂ takes
    (:func:`metaug_fast.distributed.mean_over_ranks`: every rank's θ̂ that of the global batch). Returns the
    gradients, ``None`` for a tensor of ``wrt`` that L̂ does not reach (an optimizer then skips it, as after
    ``backward()``), and L̂'s value."""
    theta = dict(model.named_parameters())
    loss = inner(model(*views))
    grads = _reduced(torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph, allow_unused=True),
                     reduce)
    theta_hat = {k: p if g is None else p - inner_lr * g for (k, p), g in zip(theta.items(), grads)}
    if not create_graph:
        theta_hat = {k: p.detach() for k, p in theta_hat.items()}
    loss_hat = outer(_virtual(model, theta_hat, views))
    if not wrt:
        return [], loss_hat.detach()
    return list(torch.autograd.grad(loss_hat, list(wrt), allow_unused=True)), loss_hat.detach()


def _reduced(grads: Sequence[Optional[Tensor]], reduce) -> List[Optional[Tensor]]:
    """``grads`` through ``reduce`` (None: as they are); ``None`` entries stay ``None``."""
    if reduce is None:
        return list(grads)
    done = iter(reduce([g for g in grads if g is not None]))
    return [None if g is None else next(done) for g in grads]


def meta_gradient(model: nn.Module, mags: Sequence[nn.Module], bank: MemoryBank, views: Tuple[Tensor, Tensor],
                  neg_index: Tensor, cfg: MetAugConfig) -> Tuple[List[Tensor], Tensor]:
    """∇_ω [L(θ̂, ϑ̂, ω) + α·R_σ] with θ̂ = θ - ℓ·∇_θ L(θ, ϑ, ω), the graph of ∇_θ L kept (second order), for
    the ``"features"`` formulation with fixed ``neg_index`` and no bank writes.

    ``model(v1, v2) -> (z1, z2)`` holds θ and ϑ. Returns the gradients, in the order of
    ``[p for m in mags for p in m.parameters()]``, and the meta objective's value.
    """
    def inner(zs):
        return objective(*zs, mags, bank, neg_index, cfg)[0]

    def outer(zs):
        return _with_margin(*objective(*zs, mags, bank, neg_index, cfg), cfg, "meta")

    omega = [p for m in mags for p in m.parameters()]
    return lookahead_gradient(model, views, inner, outer, cfg.inner_lr, omega)


class MetAugStep:
    """One MetAug training iteration: encoder step, meta step, memory-bank update.

    With ``cfg.variant`` (the official files are those of github.com/jiangmengli/metaug):

    - ``"metaug"``: (θ, ϑ) ← SGD on L; ω ← SGD on ∇_ω [L(θ̂, ω) + α·R_σ], θ̂ = θ - ℓ·∇_θ L (train_MetAug.py
      at the repository's head, 98acb57);
    - ``"metaug2"``: train_MetAug2.py at the head (33a9fd0). After the same two steps, a second MAG update
      on ∇_ω L(θ, ω̂), ω̂ = ω - ℓ·∇_ω L(θ, ω) (each MAG on its own gradient, features from a second forward
      at θ), then a look-ahead encoder update on ∇_θ L(θ̂(θ), ω) with the new ω. Under
      ``bank_writes="every_scoring"`` the bank is written seven times per iteration;
    - ``"first_upload"``: train_MetAug.py as first uploaded (3124b2e, renamed train_MetAug2.py by cc56347):
      the encoder step, the ω̂ MAG update alone (no θ̂ meta step), the look-ahead encoder update; five
      writes;
    - ``"lookahead"``: this library's own, in no official file: the ``"metaug"`` iteration followed by the
      look-ahead encoder update (``"metaug2"`` without its ω̂ update).

    ``cfg.matched_side_effects`` (only-OUCL) runs the meta step's forwards without a MAG, for what MetAug
    does besides its MAG step: ``"all"`` keeps their bank writes and BatchNorm running statistics (the forward
    at θ updates them; the one at θ̂ never does), ``"bank_writes"`` keeps the writes and restores the
    statistics, ``"batchnorm"`` keeps the statistics and writes nothing.

    With ``cfg.chunk_size`` smaller than the batch, the encoder step is gradient-cached
    (:func:`metaug_fast.large_batch.cached_backward`): the encoder runs ``chunk_size`` samples at a time and
    its memory no longer grows with the batch; its update equals the plain step's on the same chunks. The
    meta step, a second derivative through the whole encoder that no cache can give exactly, then runs on a
    random sub-batch of ``chunk_size`` samples (the same negatives rows): an unbiased estimate of the
    MAG gradient's batch mean at the memory of one chunk.

    Args:
        model: ``model(*views) -> features``, one normalized ``[B, D]`` per view (encoders and heads).
        mags: one :class:`MetaFeatureAugmenter` per view (unused unless ``cfg.method == "metaug"``).
        bank: the :class:`MemoryBank`, one bank per view.
        data_parallel: the model wrapped in ``DistributedDataParallel`` (whose backward averages θ, ϑ
            gradients over ranks); the encoder step runs through it. With it, the MAG gradients of the meta
            step are averaged over the ranks of ``group`` too, and every rank's features update the bank,
            so the replicated bank, the model and the MAGs stay identical on every rank.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from metaug_fast.metaug import MemoryBank, MetaFeatureAugmenter, MetAugConfig, MetAugStep
        >>> class Model(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc = nn.Linear(10, 8)
        ...     def forward(self, v1, v2):
        ...         return tuple(nn.functional.normalize(self.enc(v), dim=1) for v in (v1, v2))
        >>> mags = nn.ModuleList(MetaFeatureAugmenter(8, 16) for _ in range(2))
        >>> step = MetAugStep(Model(), mags, MemoryBank(100, 8, views=2), MetAugConfig(k_neg=32))
        >>> views, index = (torch.randn(4, 10), torch.randn(4, 10)), torch.arange(4)
        >>> sorted(step(views, index, torch.Generator().manual_seed(0)))
        ['loss', 'meta']
    """

    def __init__(self, model: nn.Module, mags: nn.ModuleList, bank: MemoryBank, cfg: MetAugConfig,
                 data_parallel: Optional[nn.Module] = None, group=None) -> None:
        views = bank.features.shape[0]
        if cfg.objective in ("features", "batch") and views != 2:
            raise ValueError(f"objective={cfg.objective!r} is defined for 2 views, the bank has {views}: "
                             "use objective='memory' for 3")
        if views not in (2, 3):
            raise ValueError(f"MetAugStep takes 2 or 3 views, the bank has {views}")
        if cfg.method == "metaug" and len(mags) != views:
            raise ValueError(f"one MAG per view: {views} views, {len(mags)} MAGs")
        self.model, self.mags, self.bank, self.cfg = model, mags, bank, cfg
        self.data_parallel, self.group = data_parallel, group
        # The batch objective's loss is the global batch's: every rank's θ̂ (and ω̂) takes the gradient of
        # that loss, the mean over ranks of the shares scaled by W, as one process holding the batch would.
        in_batch = cfg.objective == "batch" and data_parallel is not None
        self._reduce = (lambda grads: D.mean_over_ranks(grads, group)) if in_batch else None
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.mag_opt = torch.optim.SGD(mags.parameters(), lr=cfg.mag_lr, momentum=cfg.mag_momentum,
                                       weight_decay=cfg.mag_weight_decay)
        self._mag_inputs = torch.zeros(2, sum(p.numel() for p in mags.parameters()),
                                       device=bank.features.device)

    def __call__(self, views: Sequence[Tensor], index: Tensor, generator: torch.Generator) -> Dict[str, float]:
        """One iteration on ``views`` (one ``[B, ...]`` input per view) of the samples ``index [B]``; negatives
        are drawn from ``generator``. Returns ``{"loss": ..., "meta": ...}`` (floats)."""
        cfg, views = self.cfg, tuple(views)
        B = views[0].shape[0]
        neg_index = self.bank.sample(B, cfg.k_neg, generator) if cfg.objective == "features" else None
        cached = 0 < cfg.chunk_size < B
        writes = cfg.bank_writes == "every_scoring"

        def loss_fn(zs, write: Writer = None, index=index, neg_index=neg_index, mags=self.mags):
            if cfg.objective == "features":
                return objective(*zs, mags, self.bank, neg_index, cfg, write=write)
            if cfg.objective == "batch":
                return batch_objective(*zs, mags, index, cfg, self.group, self.data_parallel is not None)
            return memory_objective(zs, mags, self.bank, index, cfg, generator, write=write)

        def writer(idx):
            return (lambda zs: self._write(idx, zs)) if writes else None

        # 1. Encoder step on L(θ, ϑ, ω) with ω fixed.
        self.opt.zero_grad(set_to_none=True)
        if cached:
            loss, zs = large_batch.cached_backward(self.data_parallel or self.model, views,
                                                   lambda *zs: loss_fn(zs)[0], chunk_size=cfg.chunk_size,
                                                   return_embeddings=True)
        else:
            zs = (self.data_parallel or self.model)(*views)
            loss = loss_fn(zs, writer(index))[0]
            loss.backward()
        self.opt.step()
        out = {"loss": loss.item()}
        # 2. Meta step on ω, or the control's forwards.
        if cfg.method == "metaug" or cfg.matched_side_effects != "none":
            sub_views, sub_index, sub_negs = views, index, neg_index
            if cached:
                pick = torch.randperm(B, generator=generator)[:cfg.chunk_size].to(views[0].device)
                sub_views, sub_index, sub_negs = tuple(v[pick] for v in views), index[pick], neg_index[pick]
            if cfg.variant != "first_upload":
                grads, meta = self._meta(sub_views, sub_index, sub_negs, loss_fn, writer)
                if grads:
                    self._apply(self.mag_opt, self.mags.parameters(), grads)
                out["meta"] = meta.item()
            if cfg.variant in MAG_LOOKAHEAD_VARIANTS:
                grads, meta = self._mag_lookahead(sub_views, sub_index, loss_fn, writer)
                self._apply(self.mag_opt, self.mags.parameters(), grads)
                out.setdefault("meta", meta.item())
        # 3. The variants' look-ahead encoder update.
        if cfg.variant in LOOKAHEAD_VARIANTS:
            params = list(self.model.parameters())
            loss_of = lambda zs: loss_fn(zs, writer(index))[0]
            grads, _ = lookahead_gradient(self.model, views, loss_of, loss_of, cfg.inner_lr, params,
                                          reduce=self._reduce)
            self._apply(self.opt, params, grads)
        # 4. Memory bank: momentum update with this step's (pre-update) features, after scoring (the batch
        # objective has none to update).
        if not writes and cfg.objective != "batch":
            self._write(index, zs)
        return out

    def _meta(self, views, index, neg_index, loss_fn, writer) -> Tuple[List[Tensor], Tensor]:
        """∇_ω of the meta objective (MetAug), or the control's forwards and writes with no gradient."""
        cfg = self.cfg
        write = None if cfg.matched_side_effects == "batchnorm" else writer(index)

        def scored(zs):
            return loss_fn(zs, write, index=index, neg_index=neg_index)

        if cfg.method == "metaug":
            return lookahead_gradient(self.model, views, lambda zs: scored(zs)[0],
                                      lambda zs: _with_margin(*scored(zs), cfg, "meta"), cfg.inner_lr,
                                      list(self.mags.parameters()), reduce=self._reduce)
        restore = cfg.matched_side_effects == "bank_writes"
        kept = {k: b.clone() for k, b in self.model.named_buffers()} if restore else None
        out = lookahead_gradient(self.model, views, lambda zs: scored(zs)[0], lambda zs: scored(zs)[0],
                                 cfg.inner_lr, [], create_graph=False, reduce=self._reduce)
        if restore:
            with torch.no_grad():
                for k, b in self.model.named_buffers():
                    b.copy_(kept[k])
        return out

    def _mag_lookahead(self, views, index, loss_fn, writer) -> Tuple[List[Tensor], Tensor]:
        """train_MetAug2.py's step 2b: ∇_ω L(θ, ω̂) with ω̂ = ω - ℓ·∇_ω L(θ, ω), features from a second
        forward at θ."""
        cfg = self.cfg
        loss = loss_fn(self.model(*views), writer(index))[0]
        zs = self.model(*views)
        virtual = []
        for mag in self.mags:
            omega = dict(mag.named_parameters())
            grads = _reduced(torch.autograd.grad(loss, list(omega.values()), create_graph=True, allow_unused=True),
                             self._reduce)
            omega_hat = {k: p if g is None else p - cfg.inner_lr * g for (k, p), g in zip(omega.items(), grads)}
            virtual.append(lambda z, m=mag, w=omega_hat: _virtual(m, w, (z,)))
        loss_hat = _with_margin(*loss_fn(zs, writer(index), mags=virtual), cfg, "meta")
        return list(torch.autograd.grad(loss_hat, list(self.mags.parameters()), allow_unused=True)), loss_hat.detach()

    def take_mag_update_parts(self) -> Tuple[float, float]:
        """What drove the MAGs since the last call: ‖ℓ′·Σ_t g_t‖ and ‖ℓ′·Σ_t λ·ω_t‖, the meta-gradient and the
        weight-decay inputs of the MAG optimizer summed over its updates (λ: ``mag_weight_decay``; the steps
        they would make without momentum, which scales both alike). Resets the sums."""
        grad, decay = (self.cfg.mag_lr * self._mag_inputs.norm(dim=1)).tolist()
        self._mag_inputs.zero_()
        return grad, decay

    @torch.no_grad()
    def _record_mag_inputs(self, params: List[Tensor], grads: List[Optional[Tensor]]) -> None:
        # SGD decays only the parameters that have a gradient.
        for row, parts in enumerate((
                [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)],
                [torch.zeros_like(p) if g is None else self.cfg.mag_weight_decay * p for p, g in zip(params, grads)])):
            self._mag_inputs[row] += torch.cat([t.reshape(-1) for t in parts]).to(self._mag_inputs)

    def _apply(self, opt: torch.optim.Optimizer, params, grads: List[Optional[Tensor]]) -> None:
        if self.data_parallel is not None:
            grads = self._average(grads)
        params = list(params)
        if opt is self.mag_opt:
            self._record_mag_inputs(params, grads)
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    def _write(self, index: Tensor, zs: Sequence[Tensor]) -> None:
        """bank_v[index] ← normalize(m·bank_v[index] + (1 - m)·z_v) for every view (every rank's rows)."""
        if self.data_parallel is not None:
            index, *zs = D.gather_all([index.to(zs[0].device), *[z.detach() for z in zs]], self.group)
        for v, z in enumerate(zs):
            self.bank.update(v, index, z)

    def _average(self, grads: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
        """The mean over ranks of ``grads`` (one all-reduce of their concatenation); ``None`` entries (the same
        on every rank: the model is) stay ``None``."""
        present = [g for g in grads if g is not None]
        flat = torch.cat([g.reshape(-1) for g in present])
        dist.all_reduce(flat, group=self.group)
        flat /= dist.get_world_size(self.group)
        averaged = iter(part.view_as(g) for part, g in zip(flat.split([g.numel() for g in present]), present))
        return [None if g is None else next(averaged) for g in grads]

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "mag_opt": self.mag_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.mag_opt.load_state_dict(state["mag_opt"])
