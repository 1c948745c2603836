"""Compiles every Triton kernel of metaug_fast for a GPU target (default sm_90) down to a cubin, with no GPU:
the same compiler a GPU run uses (front end, TTIR/TTGIR/LLVM passes, ptxas), so CI catches what the
interpreter cannot (globals that are not constexpr, unsupported ops, layout or register failures).

    python -m bench.check_triton_compile            # every kernel, the dtypes and forms that matter
    python -m bench.check_triton_compile --arch 80

Exits 1 and names the kernel and specialization that failed. Runs with TRITON_INTERPRET unset (the
interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}
ACC = {"bfloat16": "*fp32", "float16": "*fp32", "float32": "*fp32", "float64": "*fp64"}


def _jobs():
    """(module, kernel name, pointer types by argument, constexprs) for every specialization checked."""
    jobs = []
    for dtype in ("float32", "bfloat16", "float64"):
        x, acc = PTR[dtype], ACC[dtype]
        score = dict(pos_ptr=x, neg_ptr=x, pm_ptr="*u8", nm_ptr="*u8", cfg_ptr=acc, rows_ptr=acc, stats_ptr=acc,
                     g_ptr=acc, gp_ptr=x, gn_ptr=x, tp_ptr=x, tn_ptr=x, ggo_ptr=acc, hp_ptr=x, hn_ptr=x,
                     sp_ptr=x, sn_ptr=x, gsp_ptr=acc, gsn_ptr=acc)
        blocks = dict(BLOCK_B=16, BLOCK_K=128)
        forms = range(5) if dtype == "bfloat16" else (0, 2, 4)
        for form in forms:
            for masks in ((True, True), (False, False)) if form == 2 else ((True, True),):
                flags = dict(FORM=form, HAS_PM=masks[0], HAS_NM=masks[1], **blocks)
                jobs.append(("oucl_score", "_score_fwd_kernel", score, flags))
                jobs.append(("oucl_score", "_score_bwd_kernel", score, flags))
                if form:
                    jobs.append(("oucl_score", "_score_bwd_bwd_kernel", score, flags))
        for name in ("_margin_fwd_kernel", "_margin_bwd_kernel", "_margin_injection_fwd_kernel",
                     "_margin_injection_bwd_kernel"):
            jobs.append(("oucl_score", name, score, dict(HAS_PM=True, HAS_NM=False, **blocks)))
        half = dtype == "bfloat16"
        bd = 16 if dtype == "float64" else 64
        tiles = dict(BM=32 if dtype == "float64" else 64, BN=32 if dtype == "float64" else 64, BD=bd,
                     PREC="tf32" if half else "ieee", UPCAST=False)
        label = dict(e_ptr=x, r_ptr=x, iz_ptr=acc, ir_ptr=acc, lab_ptr="*i64", rlab_ptr="*i64", cfg_ptr=acc,
                     c_ptr=acc, part_ptr=acc, g_ptr=acc, stats_ptr=acc, de_ptr=acc, diz_ptr=acc, dr_ptr=acc,
                     dir_ptr=acc, out_ptr=x)
        forms = range(6) if half else (2, 5)
        for form in forms:
            for sweep in (0, 1) if form == 4 else (0,):
                jobs.append(("oucl_label", "_label_fwd_kernel", label, dict(FORM=form, SWEEP=sweep, SIM=0, **tiles)))
            bwd = dict(FORM=form, SIM=0, BDO=32 if dtype == "float64" else 128, GPREC="tf32" if half else "ieee",
                       **tiles)
            jobs.append(("oucl_label", "_label_bwd_rows_kernel", label, bwd))
            jobs.append(("oucl_label", "_label_bwd_cols_kernel", label, bwd))
        jobs.append(("similarity", "_similarity_kernel", label, dict(SIM=1, **tiles)))
    return jobs


def _compile(job, arch):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, types, constexprs = job
    kernel = getattr(importlib.import_module(f"metaug_fast.kernels.{module}"), name)
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    params = list(inspect.signature(jit.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    src = ASTSource(fn=jit, signature=signature, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    except Exception as exc:  # noqa: BLE001 (the report names the specialization)
        return f"{module}.{name} {constexprs} {types.get('e_ptr', types.get('pos_ptr'))}: {exc}"
    return None if "cubin" in compiled.asm else f"{module}.{name} {constexprs}: no cubin"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    jobs = _jobs()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        failures = [f for f in pool.map(_compile, jobs, [args.arch] * len(jobs)) if f]
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    print(f"Triton: {len(jobs) - len(failures)}/{len(jobs)} kernel specializations compiled to sm_{args.arch} cubins "
          f"in {time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
