"""Score-mode OUCL on the CPU, reference.py against the fused C++ backend, side by side in one run.

    python -m bench.bench_oucl_score                  # B=4096, K⁺=6, K⁻=6144, fp32, all four forms
    python -m bench.bench_oucl_score --forms weighted --B 512 --repeats 3

Measures forward, forward+backward and a Hessian-vector product (double backward) per backend, the peak
extra memory of forward+backward, and writes bench/results/oucl_score_cpu.csv; prints the ratios. Beside
forward+backward, in the same run: ``compile(reference)`` (torch.compile of reference.py) and the **memory
floor**, one read and one write of the scores into new tensors (``clone``: the gradient is a new tensor too,
so the floor pays its allocation and first touch as the loss does), which a loss that must read the scores
and write their gradient cannot beat.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import metaug_fast
import metaug_fast.functional as F

from .common import median_ms, peak_extra_mb, row, set_command, write_csv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--kp", type=int, default=6)
    ap.add_argument("--kn", type=int, default=6144)
    ap.add_argument("--forms", default=",".join(metaug_fast.reference.FORMS),
                    help="comma-separated subset of " + ",".join(metaug_fast.reference.FORMS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/oucl_score_<device>.csv")
    args = ap.parse_args(argv)
    set_command("bench.bench_oucl_score", argv)

    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in metaug_fast.reference.FORMS]
    if bad or not forms:
        ap.error(f"--forms: unknown form(s) {bad}; choose from {metaug_fast.reference.FORMS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    args.out = args.out or Path(f"bench/results/oucl_score_{'gpu' if args.device == 'cuda' else 'cpu'}.csv")
    rows = []
    for form in forms:
        rows += run_form(form, args)
    write_csv(rows, args.out)
    return 0


def run_form(form: str, args) -> list:
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    pos = torch.rand(args.B, args.kp, device=args.device, requires_grad=True)
    neg = torch.rand(args.B, args.kn, device=args.device, requires_grad=True)
    vp, vn = torch.randn_like(pos), torch.randn_like(neg)
    size = f"{args.B}x{args.kp}x{args.kn}"
    input_mb = (pos.numel() + neg.numel()) * pos.element_size() / 2**20

    def loss(backend):
        return F.oucl(pos, neg, form=form, backend=backend)

    def forward(backend):
        with torch.no_grad():
            loss(backend)

    def forward_backward(backend):
        pos.grad = neg.grad = None
        loss(backend).backward()

    def hvp(backend):
        gp, gn = torch.autograd.grad(loss(backend), (pos, neg), create_graph=True)
        torch.autograd.grad((gp * vp).sum() + (gn * vn).sum(), (pos, neg))

    fused = [b for b in (("triton", "cuda") if cuda else ("cpp",)) if b in metaug_fast.available_backends()]
    backends = ["reference"] + fused
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def peak_mb(fn):
        if not cuda:
            return peak_extra_mb(fn)
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    rows, results = [], {}
    for backend in backends:
        forward_backward(backend)  # warm up outside the measurement
        pos.grad = neg.grad = None  # so the gradients count as extra memory
        mem = peak_mb(lambda: forward_backward(backend))
        for name, fn in (("forward", forward), ("forward+backward", forward_backward), ("hvp", hvp)):
            ms = median_ms(lambda: (fn(backend), sync()), args.repeats)
            results[(backend, name)] = ms
            rows.append(row(op=f"oucl_{form}", mode="score", backend=backend, dtype="float32", size=size,
                            time_ms=round(ms, 3), peak_mem_mb=round(mem, 1) if name == "forward+backward" else "",
                            **{"pass": name}))
        results[(backend, "mem")] = mem
    baselines = {"compile(reference)": _compiled_forward_backward(form, pos, neg),
                 "memory floor": lambda: (pos.detach().clone(), neg.detach().clone())}
    for name, fn in baselines.items():
        fn()
        ms = median_ms(lambda: (fn(), sync()), args.repeats)
        results[(name, "forward+backward")] = ms
        rows.append(row(op=f"oucl_{form}", mode="score", backend=name, dtype="float32", size=size,
                        time_ms=round(ms, 3), **{"pass": "forward+backward"}))

    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(f"\nscore-mode OUCL ({form}), {size}, fp32, {where}; "
          f"inputs {input_mb:.1f} MiB, inputs + gradients {2 * input_mb:.1f} MiB")
    print(f"{'pass':<18}" + "".join(f"{b + ' ms':>16}" for b in backends)
          + "".join(f"{'speed-up ' + b:>18}" for b in fused))
    for name in ("forward", "forward+backward", "hvp"):
        line = f"{name:<18}" + "".join(f"{results[(b, name)]:>16.2f}" for b in backends)
        line += "".join(f"{results[('reference', name)] / results[(b, name)]:>17.2f}x" for b in fused)
        print(line)
    line = f"{'peak extra MiB':<18}" + "".join(f"{results[(b, 'mem')]:>16.1f}" for b in backends)
    line += "".join(f"{results[('reference', 'mem')] / max(results[(b, 'mem')], 1e-9):>17.2f}x" for b in fused)
    print(line)
    for b in fused:
        ours = results[(b, "forward+backward")]
        print(f"forward+backward: {b} {ours:.2f} ms, compile(reference) "
              f"{results[('compile(reference)', 'forward+backward')]:.2f} ms "
              f"({results[('compile(reference)', 'forward+backward')] / ours:.2f}x ours), memory floor "
              f"{results[('memory floor', 'forward+backward')]:.2f} ms (ours "
              f"{ours / results[('memory floor', 'forward+backward')]:.2f}x it)")
    return rows


def _compiled_forward_backward(form: str, pos, neg):
    """forward+backward of torch.compile(reference.oucl) on ``pos``, ``neg``."""
    compiled = torch.compile(lambda p, n: metaug_fast.reference.oucl(p, n, form=form), dynamic=True)

    def run():
        pos.grad = neg.grad = None
        compiled(pos, neg).backward()

    return run


if __name__ == "__main__":
    raise SystemExit(main())
