"""Oracles and comparison helpers for the tests (independent of metaug_fast's own code)."""
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FORMS = ("hinge", "squared", "weighted", "circle")
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def pair_term(form, p, n, beta, gamma_pos=0.0, gamma_neg=0.0, margin=0.25):
    """exp(β·[...]) of one (positive, negative) pair, written as the paper writes it
    (docs/mathematics.md#oucl-forms)."""
    if form == "squared":
        return math.exp(beta * ((p - 1.0) ** 2 + n**2 - 2 * margin**2))
    if form == "weighted":
        return math.exp(beta * ((n - gamma_neg) - (p - gamma_pos)))
    gp, gn = max(1 + margin - p, 0.0), max(n + margin, 0.0)
    return math.exp(beta * (gn * (n - margin) - gp * (p - (1 - margin))))


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
    """Records the largest tensor any op allocates while active (views of existing storage do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out
