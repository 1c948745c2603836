"""Calls of every Triton operator (``torch.ops.metaug_fast_triton``) and forwards of every public function on
the Triton backend, built on any device: real CPU tensors under the interpreter, real CUDA tensors on a GPU,
or fake CUDA tensors on a machine without one (tests/triton_trace.py). Values do not matter here, only the
calls: the statistics a backward takes come from the forward of the same case."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

import metaug_fast.functional as F
from metaug_fast.contract import N_STATS, SIMILARITIES, LossParams

Case = Tuple[str, Callable, tuple]
# How many cases each list holds, so that GPU tests can be parametrized by index without building them
# (building op_cases runs forwards).
N_OP_CASES, N_PUBLIC_CASES = 25, 11


def op_cases(device, dtype: torch.dtype) -> List[Case]:
    """(name, operator, arguments) for each Triton operator: score mode 7 rows × (3, 11) with masks, label mode
    37 rows against 53 reference rows (and against themselves) at D = 70."""
    from metaug_fast.kernels import label, margins, matmul, score, similarity

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rand = lambda *s, dt=dtype: torch.rand(*s, device=device, dtype=dt)
    p, n = rand(7, 3), rand(7, 11)
    pm, nm = rand(7, 3, dt=torch.float32) > 0.3, rand(7, 11, dt=torch.float32) > 0.2
    g, sp, sn = rand(7, dt=acc), rand(7, dt=acc), rand(7, dt=acc)
    weighted, nce = LossParams("weighted").op_args(), LossParams.info_nce(0.1)
    _, stats = score.oucl_score_fwd(p, n, pm, nm, *weighted)
    m_stats = margins.margin_score_fwd(p, n, pm, nm)
    cases = [("oucl_score_fwd", score.oucl_score_fwd, (p, n, pm, nm, *weighted)),
             ("oucl_score_fwd (InfoNCE, no masks)", score.oucl_score_fwd, (p, n, None, None, *nce)),
             ("oucl_score_bwd", score.oucl_score_bwd, (g, p, n, pm, nm, stats, *weighted)),
             ("oucl_score_bwd_bwd", score.oucl_score_bwd_bwd,
              (g, rand(7, 3), rand(7, 11), p, n, pm, nm, stats, *weighted)),
             ("margin_score_fwd", margins.margin_score_fwd, (p, n, pm, nm)),
             ("margin_score_bwd", margins.margin_score_bwd, (rand(7, 2, dt=acc), p, n, pm, nm, m_stats)),
             ("margin_injection_fwd", margins.margin_injection_fwd, (p, n, pm, nm, sp, sn)),
             ("margin_injection_bwd", margins.margin_injection_bwd, (g, p, n, pm, nm, sp, sn))]

    e, r = rand(37, 70), rand(53, 70)
    iz, ir = rand(37, dt=acc) + 0.5, rand(53, dt=acc) + 0.5
    lab = torch.arange(37, device=device).remainder(5).to(torch.int32)
    rlab = torch.arange(53, device=device).remainder(7).to(torch.int32)
    cos = int(SIMILARITIES["cosine"])
    g_rows, l_stats = rand(37, dt=acc), rand(37, N_STATS, dt=acc)
    cases += [("label_partials", label.label_partials, (e, iz, r, ir, lab, rlab, *weighted, -1, cos)),
              ("label_partials (self)", label.label_partials, (e, iz, e, iz, lab, lab, *weighted, 0, cos)),
              ("label_positive_sums", label.label_positive_sums,
               (e, iz, r, ir, lab, rlab, *nce, 3, cos, rand(37, dt=acc))),
              ("label_grads", label.label_grads,
               (g_rows, l_stats, e, iz, r, ir, lab, rlab, *weighted, -1, cos, True, False)),
              ("label_grads (no reference gradient)", label.label_grads,
               (g_rows, l_stats, e, iz, r, ir, lab, rlab, *nce, -1, cos, False, False)),
              ("label_grads (self)", label.label_grads,
               (g_rows, l_stats, e, iz, e, iz, lab, lab, *weighted, 0, cos, True, True)),
              ("label_grads (margins)", label.label_grads,
               (rand(37, 2, dt=acc), l_stats, e, iz, r, ir, lab, rlab, *LossParams.margins(), -1, cos, True, False)),
              ("label_cross_grads", label.label_cross_grads,
               (g_rows, l_stats, rand(53, dt=acc), rand(53, N_STATS, dt=acc), e, iz, r, ir, lab, rlab, *nce, cos)),
              ("pairwise_similarity", similarity.pairwise_similarity, (e, iz, r, ir, cos, dtype)),
              ("mm", matmul.mm, (rand(37, 53, dt=acc), rand(70, 53, dt=acc).T, rand(37, 70, dt=acc), 0.5, 0.25)),
              ("mm (no c)", matmul.mm, (rand(37, 53, dt=acc), rand(53, 70, dt=acc), None, 1.0, 0.0))]

    # The label interface every backend shares: any integer labels, self mode by identity (r is e, ir is iz).
    labels, ref_labels = lab.long(), rlab.long()
    _, self_stats = label.oucl_label_fwd(e, iz, e, iz, labels, labels, 0, cos, *weighted)
    _, ref_stats = label.oucl_label_fwd(e, iz, r, ir, labels, ref_labels, -1, cos, *weighted)
    _, s_z, _, s_r = label.oucl_label_cross_fwd(e, iz, r, ir, labels, ref_labels, cos, *nce)
    cases += [("oucl_label_fwd (self)", label.oucl_label_fwd, (e, iz, e, iz, labels, labels, 0, cos, *weighted)),
              ("oucl_label_fwd (margins)", label.oucl_label_fwd,
               (e, iz, r, ir, labels, ref_labels, -1, cos, *LossParams.margins())),
              ("oucl_label_bwd (self)", label.oucl_label_bwd,
               (g_rows, e, iz, e, iz, labels, labels, self_stats, 0, cos, *weighted, True)),
              ("oucl_label_bwd", label.oucl_label_bwd,
               (g_rows, e, iz, r, ir, labels, ref_labels, ref_stats, -1, cos, *weighted, True)),
              ("oucl_label_cross_fwd", label.oucl_label_cross_fwd, (e, iz, r, ir, labels, ref_labels, cos, *nce)),
              ("oucl_label_cross_bwd", label.oucl_label_cross_bwd,
               (g_rows, rand(53, dt=acc), e, iz, r, ir, labels, ref_labels, s_z, s_r, cos, *nce))]
    return cases


def public_cases(device, dtype: torch.dtype) -> List[Case]:
    """(name, function, arguments) for each public function on ``backend="triton"``, forward only."""
    rand = lambda *s: torch.rand(*s, device=device, dtype=dtype)
    p, n = rand(7, 3), rand(7, 11)
    nm = torch.rand(7, 11, device=device) > 0.2
    e, r = rand(37, 70), rand(53, 70)
    lab = torch.arange(37, device=device) % 5
    rlab = torch.arange(53, device=device) % 7
    tau = torch.tensor(0.1, device=device, dtype=dtype)
    t = dict(backend="triton")
    return [
        ("F.oucl", lambda a, b: F.oucl(a, b, neg_mask=nm, **t), (p, n)),
        ("F.info_nce", lambda a, b: F.info_nce(a, b, temperature=0.1, **t), (p, n)),
        ("F.margin_statistics", lambda a, b: F.margin_statistics(a, b, neg_mask=nm, **t), (p, n)),
        ("F.margin_injection_loss", lambda a, b: F.margin_injection_loss(a, b, a[:, 0], b[:, 0], **t), (p, n)),
        ("F.oucl_embeddings (self)", lambda a: F.oucl_embeddings(a, lab, **t), (e,)),
        ("F.oucl_embeddings (reference)", lambda a, b: F.oucl_embeddings(a, lab, b, rlab, form="circle", **t), (e, r)),
        ("F.info_nce_embeddings", lambda a: F.info_nce_embeddings(a, lab, temperature=0.1, **t), (e,)),
        ("F.info_nce_embeddings (temperature tensor)",
         lambda a, b: F.info_nce_embeddings(a, lab, b, rlab, temperature=tau, average="pair", **t), (e, r)),
        ("F.margin_statistics_embeddings", lambda a, b: F.margin_statistics_embeddings(a, lab, b, rlab, **t), (e, r)),
        ("F.pairwise_similarity", lambda a, b: F.pairwise_similarity(a, b, **t), (e, r)),
        ("F.symmetric_info_nce", lambda a, b: F.symmetric_info_nce(a, b[:37], temperature=tau, similarity="dot", **t),
         (e, r)),
    ]
