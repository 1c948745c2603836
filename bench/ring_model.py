"""The ring's step time on W GPUs, projected from the compute per chunk and the bytes each hop moves: how much
of the transfer the overlapped ring hides on NVLink (8 GPUs, one node) and on InfiniBand (32 GPUs, 4 nodes).

    python -m bench.ring_model               # the table for N = 1M and 4M, D = 128, bf16, on H100s
    python -m bench.ring_model --markdown    # as docs/guides/distributed.md shows it

Per rank the ring runs W steps forward and W backward (``metaug_fast.distributed.ring``). A step scores the
chunk in hand, (N/W)² scores; its compute is the label op's predicted time for N² scores over W²
(:mod:`bench.perf_model`, the static model of the Triton kernels, which the first GPU run calibrates). A hop
moves one chunk: its normalized rows (fp32, the ring's accumulation dtype) and int64 labels, and in the
backward the gradient the chunk gathered (fp32) as well; its time is bytes / link bandwidth + latency. The
steps synchronize around the ring, so the slowest link sets every hop: on 32 GPUs over 4 nodes the ring
crosses InfiniBand 4 times and every step waits for it.

- blocking (``overlap=False``): W·compute + (W − 1)·hop each way, plus the last hop that brings each rank's
  gradient home;
- overlapped (the default): the (W − 1) hops of each way run during the steps, so each of those steps takes
  max(compute, hop); the last step's compute and the home hop stay exposed.
"""
from __future__ import annotations

import argparse
from typing import List, NamedTuple

from bench import perf_model

D_DEFAULT = 128
ROW_BYTES = 4  # the ring's rows and gradients travel in the accumulation dtype (fp32 for bf16 inputs)
LABEL_BYTES = 8


class Link(NamedTuple):
    """A ring's slowest link: ``gbs`` GB/s one way per GPU, ``latency_us`` per transfer."""

    name: str
    world: int
    gbs: float
    latency_us: float


# NVLink 4 on an 8-GPU H100 node (450 GB/s one way per GPU through the NVSwitch); across nodes one 400 Gb/s
# NDR InfiniBand adapter per GPU (50 GB/s), the usual DGX/HGX H100 layout.
LINKS = (Link("NVLink, 8 GPUs", 8, 450.0, 5.0), Link("InfiniBand NDR, 32 GPUs", 32, 50.0, 10.0))
SIZES = (1 << 20, 1 << 22)


class Step(NamedTuple):
    compute_ms: float  # per chunk, forward + backward
    hop_ms: float  # per hop, forward + backward
    blocking_ms: float
    overlapped_ms: float
    compute_only_ms: float

    @property
    def hidden(self) -> float:
        """The share of the blocking ring's transfer time that the overlap hides."""
        transfer = self.blocking_ms - self.compute_only_ms
        return 1.0 if transfer <= 0 else (self.blocking_ms - self.overlapped_ms) / transfer


def ring_step(n: int, world: int, fwd_s: float, bwd_s: float, gbs: float, latency_us: float, D: int) -> Step:
    """One forward+backward of the ring for N = ``n`` rows over ``world`` ranks, given the label op's forward
    and backward time for all N² scores (``fwd_s``, ``bwd_s``) and the link."""
    b = n / world
    c_f, c_b = fwd_s / world**2, bwd_s / world**2
    chunk = b * (D * ROW_BYTES + LABEL_BYTES)
    grad = b * D * ROW_BYTES

    def hop(nbytes: float) -> float:
        return nbytes / (gbs * 1e9) + latency_us * 1e-6

    t_f, t_b, t_home = hop(chunk), hop(chunk + grad), hop(grad)
    steps = world - 1
    blocking = world * (c_f + c_b) + steps * (t_f + t_b) + t_home
    overlapped = steps * (max(c_f, t_f) + max(c_b, t_b)) + c_f + c_b + t_home
    compute = world * (c_f + c_b)
    return Step((c_f + c_b) * 1e3, (t_f + t_b) * 1e3, blocking * 1e3, overlapped * 1e3, compute * 1e3)


def table(device: str = "H100", D: int = D_DEFAULT, dtype: str = "bfloat16") -> List[dict]:
    rows = []
    for n in SIZES:
        pred = perf_model.predict(n, D, dtype, device)
        for link in LINKS:
            s = ring_step(n, link.world, pred["forward"].seconds, pred["backward"].seconds, link.gbs,
                          link.latency_us, D)
            rows.append(dict(device=device, N=n, link=link.name, world=link.world, chunk_compute_ms=s.compute_ms,
                             hop_ms=s.hop_ms, blocking_ms=s.blocking_ms, overlapped_ms=s.overlapped_ms,
                             compute_only_ms=s.compute_only_ms, hidden=s.hidden))
    return rows


def markdown(rows: List[dict]) -> str:
    head = ("| N | link | compute per chunk | hop | compute alone | blocking | overlapped | hidden |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = [f"| {r['N']:,} | {r['link']} | {r['chunk_compute_ms']:.3g} ms | {r['hop_ms']:.3g} ms | "
            f"{r['compute_only_ms']:.4g} ms | {r['blocking_ms']:.4g} ms | {r['overlapped_ms']:.4g} ms | "
            f"{100 * r['hidden']:.0f} % |" for r in rows]
    return head + "\n".join(body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="H100", choices=sorted(perf_model.DEVICES))
    ap.add_argument("--D", type=int, default=D_DEFAULT)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rows = table(args.device, args.D)
    if args.markdown:
        print(markdown(rows))
    else:
        for r in rows:
            print(f"N={r['N']:>8} {r['link']:<24} chunk {r['chunk_compute_ms']:8.3f} ms  hop {r['hop_ms']:7.3f} ms  "
                  f"blocking {r['blocking_ms']:9.2f} ms  overlapped {r['overlapped_ms']:9.2f} ms  "
                  f"hidden {100 * r['hidden']:3.0f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
