"""Oracles and comparison helpers for the tests (independent of metaug_fast's own code)."""
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FORMS = ("hinge", "squared", "weighted", "circle")
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def pair_term(form, p, n, beta, gamma_pos=0.0, gamma_neg=0.0, margin=0.25):
    """exp(β·[...]) of one (positive, negative) pair of Python floats (:func:`_pair_exponents`)."""
    exponent = _pair_exponents(form, torch.tensor(float(p), dtype=torch.float64),
                               torch.tensor(float(n), dtype=torch.float64), beta, gamma_pos, gamma_neg, margin)
    return math.exp(float(exponent))


def explicit_rows(pos, neg, pos_mask=None, neg_mask=None, *, form="weighted", beta=16.0, gamma_pos=0.0,
                  gamma_neg=0.0, margin=0.25, lam=0.0):
    """Per-row OUCL by explicit loops over all B×K⁺×K⁻ pairs in Python floats (float64)."""
    out = []
    for i in range(pos.shape[0]):
        ps = [float(pos[i, k]) for k in range(pos.shape[1]) if pos_mask is None or pos_mask[i, k]]
        ns = [float(neg[i, j]) for j in range(neg.shape[1]) if neg_mask is None or neg_mask[i, j]]
        if not ps or not ns:
            out.append(0.0)
        elif form == "hinge":
            out.append(max(sum(ns) - sum(ps) + lam, 0.0))
        else:
            total = sum(pair_term(form, p, n, beta, gamma_pos, gamma_neg, margin) for p in ps for n in ns)
            out.append(math.log1p(total) / beta)
    return torch.tensor(out, dtype=torch.float64)


def explicit_label_scores(emb, labels, ref_emb=None, ref_labels=None, similarity="shifted_cosine"):
    """Scores and masks of label mode by explicit loops."""
    own = ref_emb is None
    ref_emb, ref_labels = (emb, labels) if own else (ref_emb, ref_labels)
    B, M = emb.shape[0], ref_emb.shape[0]
    S = torch.zeros(B, M, dtype=torch.float64)
    pm = torch.zeros(B, M, dtype=torch.bool)
    nm = torch.zeros(B, M, dtype=torch.bool)
    for i in range(B):
        a = emb[i].double()
        for j in range(M):
            b = ref_emb[j].double()
            cos = float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-300)
            S[i, j] = (1 + cos) / 2 if similarity == "shifted_cosine" else cos
            if own and i == j:
                continue
            same = bool(labels[i] == ref_labels[j])
            pm[i, j], nm[i, j] = same, not same
    return S, pm, nm


def reduce_rows(rows, valid, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(int(valid.sum()), 1)


def assert_equals_pml_ntxent(loss_fn, B, D, value_tol, grad_tol):
    """``loss_fn(emb, labels)`` equals pytorch-metric-learning's NTXentLoss at τ = 0.1 on two views of ``B``
    samples (``emb [2B, D]`` fp64, labels arange(B) twice), loss within ``value_tol`` and gradients within
    ``grad_tol`` (relative; absolute 1e-13 and 1e-12)."""
    import pytest

    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = torch.randn(2 * B, D, dtype=torch.float64)
    labels = torch.arange(B).repeat(2)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    want = pml.NTXentLoss(temperature=0.1)(e1, labels)
    got = loss_fn(e2, labels)
    torch.testing.assert_close(got, want, rtol=value_tol, atol=1e-13)
    want.backward()
    got.backward()
    torch.testing.assert_close(e2.grad, e1.grad, rtol=grad_tol, atol=1e-12)


def rel_err(x, ref):
    """max |x - ref| / max |ref| (0 when both vanish)."""
    x, ref = x.double(), ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (x - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def hvp(loss_fn, inputs, vectors):
    """(loss, grads, H·v) through autograd with create_graph."""
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    hv = torch.autograd.grad(dot, inputs, allow_unused=True)
    hv = tuple(torch.zeros_like(x) if h is None else h for x, h in zip(inputs, hv))
    return loss.detach(), tuple(g.detach() for g in grads), hv


def score_data(B, kp, kn, dtype=torch.float64, masked=True):
    """(pos [B,K⁺], neg [B,K⁻], pos_mask, neg_mask) in [0, 1); the masks keep about 70% and leave row 0
    without positives and row 2 without negatives (None when not ``masked``)."""
    pos, neg = torch.rand(B, kp, dtype=torch.float64).to(dtype), torch.rand(B, kn, dtype=torch.float64).to(dtype)
    if not masked:
        return pos, neg, None, None
    pm, nm = torch.rand(B, kp) < 0.7, torch.rand(B, kn) < 0.7
    pm[0] = False
    if B > 2:
        nm[2] = False
    return pos, neg, pm, nm


def score_hvp_run(fn, pos, neg, vecs):
    """(loss, ∂/∂pos, ∂/∂neg, H·v for pos, H·v for neg) of ``fn(pos, neg).sum()``."""
    p, n = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    loss, grads, hv = hvp(lambda p, n: fn(p, n).sum(), (p, n), vecs)
    return (loss,) + grads + hv


def label_data(B, M, D=5, dtype=torch.float64, n_classes=4):
    """(emb [B,D], labels [B], ref [M,D], ref_labels [M]); ref and ref_labels are None when M is None.
    Reference labels include a class that no anchor has."""
    emb = torch.randn(B, D, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, n_classes, (B,))
    if M is None:
        return emb, labels, None, None
    ref = torch.randn(M, D, dtype=torch.float64).to(dtype)
    return emb, labels, ref, torch.randint(0, n_classes + 1, (M,))


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op allocates while active (views of existing storage do not count), and
    the names of the ops called (``seen``: "mm", "oucl_label_hvp", ...)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.__name__.split(".")[0])
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


# ----------------------------------------------------------------------------------- the pair oracle
# Every op of the backends' interface written pair by pair from its definition (docs/mathematics.md), in
# differentiable torch ops: the whole B×K⁺×K⁻ tensor of pair exponents under one log-sum-exp, where
# reference.py factorizes it into a positive and a negative log-sum-exp; InfoNCE as the log of a softmax
# over [p_k, n_1, …]; label-mode scores as dot products over products of norms. It imports nothing of
# metaug_fast, so the contract grid's reference entry is compared with something that can disagree with it.
def _pair_exponents(form, p, n, beta, gamma_pos, gamma_neg, margin):
    """β·[...] of every pair, written as the paper writes it (docs/mathematics.md#oucl-forms): ``p [B, K⁺, 1]``
    against ``n [B, 1, K⁻]`` -> ``[B, K⁺, K⁻]`` (any broadcastable shapes; Γ⁺, Γ⁻ of the circle are
    constants, at every order). An unknown form raises."""
    if form == "squared":
        return beta * ((p - 1.0) ** 2 + n**2 - 2 * margin**2)
    if form == "weighted":
        return beta * ((n - gamma_neg) - (p - gamma_pos))
    if form != "circle":
        raise ValueError(f"no pair term for form {form!r}")
    gp, gn = torch.relu(1 + margin - p).detach(), torch.relu(n + margin).detach()
    return beta * (gn * (n - margin) - gp * (p - (1 - margin)))


def log1p_sum_exp(x, dim):
    """log(1 + Σ exp x) along ``dim`` (``-inf`` entries count 0), accurate where the sum is tiny (log1p) and
    where it overflows (shifted by m = max(0, max x), a constant: the value does not depend on it)."""
    m = x.amax(dim, keepdim=True).clamp(min=0).detach() if x.shape[dim] else torch.zeros_like(x.sum(dim, True))
    return (m + torch.log1p(torch.expm1(-m) + torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


def _full_mask(x, mask):
    return torch.ones(x.shape, dtype=torch.bool, device=x.device) if mask is None else mask


def _as_acc(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kept(x, mask):
    """``x`` in the accumulation dtype with the entries ``mask`` drops set to 0, so that a NaN there reaches no
    gradient through the ops that follow."""
    return torch.where(mask, _as_acc(x), torch.zeros((), dtype=_as_acc(x).dtype))


def _reduce(rows, valid, reduction, dtype, count=None):
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.to(dtype)
    total = rows.sum()
    if reduction == "mean":
        total = total / max(float(valid.sum() if count is None else count), 1.0)
    return total.to(dtype)


def oracle_oucl(pos, neg, *, form="weighted", beta=16.0, gamma_pos=0.0, gamma_neg=0.0, margin=0.25, lam=0.0,
                pos_mask=None, neg_mask=None, reduction="mean"):
    pm, nm = _full_mask(pos, pos_mask), _full_mask(neg, neg_mask)
    valid = pm.any(1) & nm.any(1)
    p, n = _kept(pos, pm), _kept(neg, nm)
    if form == "hinge":
        rows = torch.relu(n.sum(1) - p.sum(1) + lam)
        return _reduce(rows, valid, reduction, pos.dtype)
    pairs = pm[:, :, None] & nm[:, None, :] & valid[:, None, None]
    e = _pair_exponents(form, p[:, :, None], n[:, None, :], beta, gamma_pos, gamma_neg, margin)
    e = torch.where(pairs, e, torch.full((), float("-inf"), dtype=e.dtype))
    return _reduce(log1p_sum_exp(e.flatten(1), 1) / beta, valid, reduction, pos.dtype)


def oracle_info_nce(pos, neg, *, temperature=0.07, pos_mask=None, neg_mask=None, reduction="mean",
                    average="anchor"):
    pm, nm = _full_mask(pos, pos_mask), _full_mask(neg, neg_mask)
    valid = pm.any(1) & nm.any(1)
    p, n = _kept(pos, pm) / temperature, _kept(neg, nm) / temperature
    ninf = torch.full((), float("-inf"), dtype=p.dtype)
    # -log(e^{p_k} / (e^{p_k} + Σ_j e^{n_j})) = log(1 + Σ_j e^{n_j - p_k}), every (positive, negative) pair.
    pairs = torch.where(nm[:, None, :] & valid[:, None, None], n[:, None, :] - p[:, :, None], ninf)
    per_pos = torch.where(pm, log1p_sum_exp(pairs, 2), torch.zeros((), dtype=p.dtype))
    n_pos = pm.sum(1)
    if average == "anchor":
        return _reduce(per_pos.sum(1) / n_pos.clamp(min=1), valid, reduction, pos.dtype)
    rows = torch.where(valid, per_pos.sum(1), torch.zeros((), dtype=p.dtype))
    return _reduce(rows, torch.ones_like(valid), reduction, pos.dtype, count=n_pos.sum())


def oracle_margin_statistics(pos, neg, pos_mask=None, neg_mask=None):
    pm, nm = _full_mask(pos, pos_mask), _full_mask(neg, neg_mask)
    valid = pm.any(1) & nm.any(1)
    p, n = _as_acc(pos), _as_acc(neg)
    inf = torch.full((), float("inf"), dtype=p.dtype)
    p_min = torch.where(pm, p, inf).amin(1) if p.shape[1] else inf.expand(p.shape[0])
    n_max = torch.where(nm, n, -inf).amax(1) if n.shape[1] else (-inf).expand(n.shape[0])
    sigma_pos = torch.where(valid, torch.minimum(p_min, n_max), inf)
    sigma_neg = torch.where(valid, torch.maximum(p_min, n_max), -inf)
    return sigma_pos.to(pos.dtype), sigma_neg.to(pos.dtype)


def oracle_margin_injection_loss(pos_aug, neg_aug, sigma_pos, sigma_neg, *, detach_margin=False, reduction="mean",
                                 pos_mask=None, neg_mask=None):
    sp, sn = _as_acc(sigma_pos), _as_acc(sigma_neg)
    if detach_margin:
        sp, sn = sp.detach(), sn.detach()
    pm, nm = _full_mask(pos_aug, pos_mask), _full_mask(neg_aug, neg_mask)
    zero = torch.zeros((), dtype=sp.dtype)
    over = torch.where(pm, torch.relu(_as_acc(pos_aug) - sp[:, None]), zero).sum(1) / pm.sum(1).clamp(min=1)
    under = torch.where(nm, torch.relu(sn[:, None] - _as_acc(neg_aug)), zero).sum(1) / nm.sum(1).clamp(min=1)
    rows = over + under
    if reduction == "none":
        return rows.to(pos_aug.dtype)
    return (rows.sum() / (max(rows.shape[0], 1) if reduction == "mean" else 1)).to(pos_aug.dtype)


def oracle_label_scores(emb, labels, ref_emb=None, ref_labels=None, similarity="shifted_cosine", self_offset=None):
    """(scores [B, M], positive mask, negative mask) of label mode: d(a, b) = a·b / (max(‖a‖, ε)·max(‖b‖, ε))
    (cos; "dot": a·b as given), without the pair (i, i + offset) among the positives."""
    own = ref_emb is None
    ref, ref_labels = (emb, labels) if own else (ref_emb, ref_labels)
    a, b = _as_acc(emb), _as_acc(ref)
    s = a @ b.T
    if similarity != "dot":
        s = s / (a.norm(dim=1).clamp(min=1e-12)[:, None] * b.norm(dim=1).clamp(min=1e-12)[None, :])
        if similarity == "shifted_cosine":
            s = (1 + s) / 2
    same = labels[:, None] == ref_labels[None, :]
    offset = 0 if own else self_offset
    excluded = torch.zeros_like(same)
    if offset is not None:
        i = torch.arange(emb.shape[0])
        excluded[i, i + offset] = True
    return s, same & ~excluded, ~same


def oracle_oucl_embeddings(emb, labels, ref_emb=None, ref_labels=None, *, similarity="shifted_cosine",
                           reduction="mean", self_offset=None, **params):
    s, pm, nm = oracle_label_scores(emb, labels, ref_emb, ref_labels, similarity, self_offset)
    return oracle_oucl(s, s, pos_mask=pm, neg_mask=nm, reduction=reduction, **params).to(emb.dtype)


def oracle_info_nce_embeddings(emb, labels, ref_emb=None, ref_labels=None, *, temperature=0.07, similarity="cosine",
                               reduction="mean", average="anchor", self_offset=None):
    s, pm, nm = oracle_label_scores(emb, labels, ref_emb, ref_labels, similarity, self_offset)
    return oracle_info_nce(s, s, temperature=temperature, pos_mask=pm, neg_mask=nm, reduction=reduction,
                           average=average).to(emb.dtype)


def oracle_margin_statistics_embeddings(emb, labels, ref_emb=None, ref_labels=None, *, similarity="shifted_cosine"):
    s, pm, nm = oracle_label_scores(emb, labels, ref_emb, ref_labels, similarity)
    return tuple(x.to(emb.dtype) for x in oracle_margin_statistics(s, s, pm, nm))


def oracle_symmetric_info_nce(emb, ref_emb, labels, ref_labels, **kw):
    return (oracle_info_nce_embeddings(emb, labels, ref_emb, ref_labels, **kw)
            + oracle_info_nce_embeddings(ref_emb, ref_labels, emb, labels, **kw)) / 2


def oracle_pairwise_similarity(a, b, *, similarity="shifted_cosine"):
    labels = torch.zeros(a.shape[0], dtype=torch.long)
    return oracle_label_scores(a, labels, b, torch.zeros(b.shape[0], dtype=torch.long), similarity)[0].to(a.dtype)


ORACLE = {name[len("oracle_"):]: fn for name, fn in list(globals().items()) if name.startswith("oracle_")
          and name != "oracle_label_scores"}


def oracle(op, *args, **kwargs):
    """``op`` of the backends' interface by :data:`ORACLE`, called as a backend record is."""
    return ORACLE[op](*args, **kwargs)
