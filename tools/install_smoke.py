"""What a user of an installed metaug_fast does first, run from outside the source tree by
tools/check_install.py with the interpreter of a fresh environment:

    python install_smoke.py SITE_PACKAGES BACKENDS

SITE_PACKAGES: where ``metaug_fast`` must be imported from (not a checkout); BACKENDS: the comma-separated
list ``available_backends()`` must give. It imports every module of the package, runs one op on each
backend (the Triton kernels in Triton's interpreter, in a child process) against the reference, one drop-in
per peer library against that library, and the command lines' ``--help``. Standalone on purpose: it must
not import anything from the source tree.
"""
import importlib
import os
import pkgutil
import subprocess
import sys

import torch

TRITON_CHILD = """
import torch, metaug_fast.functional as F
z, y = torch.randn(24, 16, dtype=torch.float64), torch.arange(12).repeat(2)
ours, ref = F.oucl_embeddings(z, y, backend="triton"), F.oucl_embeddings(z, y, backend="reference")
assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12), (ours, ref)
print("triton", float(ours))
"""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"install smoke test failed: {what}")


def main() -> None:
    site, backends = sys.argv[1], sys.argv[2].split(",")
    import metaug_fast
    import metaug_fast.functional as F

    here = os.path.dirname(metaug_fast.__file__)
    check(here.startswith(site), f"metaug_fast imported from {here}, not from {site}")
    modules = [m.name for m in pkgutil.walk_packages(metaug_fast.__path__, "metaug_fast.")]
    for name in modules:
        importlib.import_module(name)
    print(f"imported {len(modules)} modules from {here}")

    check(metaug_fast.available_backends() == backends,
          f"available_backends() = {metaug_fast.available_backends()}, expected {backends}")
    torch.manual_seed(0)
    pos, neg = torch.rand(8, 3, dtype=torch.float64), torch.rand(8, 40, dtype=torch.float64)
    ref = F.oucl(pos, neg, backend="reference")
    for backend in backends:
        value = F.oucl(pos, neg, backend=backend)
        check(torch.allclose(value, ref, rtol=1e-10, atol=1e-12), f"F.oucl on {backend}: {value} != {ref}")
        print(f"backend {backend}: F.oucl = {float(value):.12f}")
    child = subprocess.run([sys.executable, "-c", TRITON_CHILD], env={**os.environ, "TRITON_INTERPRET": "1"},
                           capture_output=True, text=True, timeout=600)
    check(child.returncode == 0, f"the Triton backend under the interpreter:\n{child.stderr[-3000:]}")
    print(child.stdout.strip())

    emb, labels = torch.randn(32, 16, dtype=torch.float64), torch.arange(16).repeat(2)
    from pytorch_metric_learning import losses as pml

    from metaug_fast.losses import pml as our_pml
    ours, peer = our_pml.CircleLoss()(emb, labels), pml.CircleLoss()(emb, labels)
    check(torch.allclose(ours, peer, rtol=1e-10), f"pml CircleLoss: {ours} != {peer}")

    from open_clip.loss import ClipLoss

    from metaug_fast.losses import open_clip as our_clip
    img, txt = torch.randn(16, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    ours, peer = our_clip.ClipLoss()(img, txt, 10.0), ClipLoss()(img, txt, 10.0)
    check(torch.allclose(ours, peer, rtol=1e-10), f"open_clip ClipLoss: {ours} != {peer}")

    from lightly.loss import NTXentLoss

    from metaug_fast.losses import lightly as our_lightly
    a, b = emb[:16], emb[16:]
    ours, peer = our_lightly.NTXentLoss()(a, b), NTXentLoss()(a, b)
    check(torch.allclose(ours, peer, rtol=1e-10), f"lightly NTXentLoss: {ours} != {peer}")

    from metaug_fast.losses import official
    outs = [torch.randn(8, 7, 1, dtype=torch.float64) for _ in range(6)]
    check(bool(torch.isfinite(official.CircleLoss()(*outs))), "the official criterion's CircleLoss")
    print("drop-ins: pml, open_clip, lightly, official")

    bindir = os.path.dirname(sys.executable)
    for script in ("metaug-demo", "metaug-train", "metaug-compare"):
        run = subprocess.run([os.path.join(bindir, script), "--help"], capture_output=True, text=True, timeout=300)
        check(run.returncode == 0 and "usage" in run.stdout, f"{script} --help:\n{run.stderr[-2000:]}")
    print("command lines: metaug-demo, metaug-train, metaug-compare --help")
    print("install smoke test passed")


if __name__ == "__main__":
    main()
