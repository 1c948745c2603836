"""OUCLLoss, the nn.Module users import."""
import torch

import metaug_fast
import metaug_fast.functional as F
from metaug_fast import OUCLLoss, reference


def test_module_forward_and_embeddings_match_functional():
    pos, neg = torch.rand(5, 2, requires_grad=True), torch.rand(5, 9)
    pm = torch.rand(5, 2) < 0.8
    fn = OUCLLoss(form="circle", beta=32.0, margin=0.3, similarity="cosine")
    torch.testing.assert_close(fn(pos, neg, pos_mask=pm),
                               reference.oucl(pos, neg, form="circle", beta=32.0, margin=0.3, pos_mask=pm))
    emb, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 3] * 2)
    bank, bank_labels = torch.randn(16, 4), torch.arange(16) % 4
    want = reference.oucl_embeddings(emb, labels, bank, bank_labels, form="circle", beta=32.0, margin=0.3,
                                     similarity="cosine")
    torch.testing.assert_close(fn.embeddings(emb, labels, bank, bank_labels), want, rtol=1e-5, atol=1e-6)
    fn(pos, neg).backward()
    assert pos.grad is not None and "circle" in repr(fn)


def test_defaults_are_the_official_setting():
    # ℓ = (1/16)·log(1 + ΣΣ e^{16(n - p)})
    fn = OUCLLoss()
    pos, neg = torch.tensor([[0.9, 0.7]]), torch.tensor([[0.2, 0.4, 0.1]])
    want = torch.log1p(torch.exp(16 * (neg[0][None, :] - pos[0][:, None])).sum()) / 16
    torch.testing.assert_close(fn(pos, neg), want)
    assert fn.similarity == "shifted_cosine" and fn.params["reduction"] == "mean"


def test_top_level_exports():
    for name in ["OUCLLoss", "available_backends", "functional", "reference", "oucl", "oucl_embeddings",
                 "pairwise_similarity", "margin_statistics", "margin_injection_loss", "info_nce"]:
        assert hasattr(metaug_fast, name)
    for name in ["oucl", "oucl_embeddings", "pairwise_similarity", "margin_statistics",
                 "margin_injection_loss", "info_nce"]:
        assert callable(getattr(F, name)) and callable(getattr(reference, name))
