"""Compiles every Triton kernel of metaug_fast for a GPU target (default sm_90) down to a cubin, with no GPU:
the same compiler a GPU run uses (front end, TTIR/TTGIR/LLVM passes, ptxas), so CI catches what the
interpreter cannot (globals that are not constexpr, unsupported ops, layout or register failures).

    python -m tools.check_triton_compile            # every kernel, the dtypes and forms that matter
    python -m tools.check_triton_compile --arch 80  # label and similarity kernels: compile, shared memory

Each kernel is compiled with the options its launcher uses (``COMPILE_OPTIONS`` of its module, the label
kernels' default tile configuration with its warps and stages, and every candidate tile shape of the GPU
sweep, and every configuration a score-mode kernel autotunes over), the label and similarity kernels
specialized as a launch on contiguous rows of D = 128 is. Beyond compiling, properties the interpreter cannot
show are checked on the result: no score-mode kernel lets a multiply and an add be fused (their
Hessian-vector products need exactly rounded products), and the double backward's critical products stay
rounded even when compiled with fusion on (PINNED: torch.compile before torch 2.14 drops the option); no
kernel spills registers (a spill in the tile loop costs local-memory traffic per score); no label kernel
sits at the register cap or uses more shared memory than the target has (SHARED_BUDGET). The tiles are
tuned for sm_90 (TUNED_ARCH); for sm_80/86/89 the label and similarity kernels must compile within the
target's shared memory (spills there cost speed, and are not failures). The half dtypes' label kernels are
compiled at every width whose tiles differ (WIDTHS). Exits 1 and names the kernel and specialization that
failed. Runs with TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple

PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}
ACC = {"bfloat16": "*fp32", "float16": "*fp32", "float32": "*fp32", "float64": "*fp64"}
# The loss parameters are fp64 scalars (annotated so in the kernels).
LOSS = {name: "fp64" for name in ("beta", "inv_beta", "gamma_pos", "gamma_neg", "margin", "lam", "alpha", "offset",
                                  "sim_a", "sim_b")}
# Launch options that are not constexpr arguments of the kernel.
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class Job(NamedTuple):
    module: str
    kernel: str
    dtype: str
    constexprs: Dict[str, object]
    D: int = 128  # the embedding width whose configuration it is (a runtime argument of the kernel)

    def label(self) -> str:
        spec = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.module}.{self.kernel}[{self.dtype}, D={self.D}; {spec}]"


# The target the tiles are tuned for (H100/H200): no spill and no label kernel at the register cap there. Other
# targets (--arch 80, 86, 89) check the label and similarity kernels' compile and shared memory only: their
# mma.sync code allocates registers differently (sm_89 spilled 8-56 bytes in some of these tiles), which costs
# them speed, not correctness.
TUNED_ARCH = 90
# Shared memory one program may use, by target: sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB, sm_86/sm_89
# (RTX 30/40, A10, L4) 99 KiB.
SHARED_BUDGET = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
# The label kernels' widths beyond D = 128 whose configurations differ (kernels/label.config): resident row
# blocks of 32, 64 and 256 features, and D = 512 in 64-feature chunks.
WIDTHS = (32, 64, 256, 512)
# The modules of label-mode kernels, held to the register cap and the shared-memory budget.
LABEL_MODULES = ("label", "label_hvp")


def _types(dtype: str) -> Dict[str, str]:
    x, acc = PTR[dtype], ACC[dtype]
    return dict(pos_ptr=x, neg_ptr=x, pm_ptr="*u8", nm_ptr="*u8", rows_ptr=acc, stats_ptr=acc, g_ptr=acc, gp_ptr=x,
                gn_ptr=x, tp_ptr=x, tn_ptr=x, ggo_ptr=acc, hp_ptr=x, hn_ptr=x, sp_ptr=x, sn_ptr=x, gsp_ptr=acc,
                gsn_ptr=acc, e_ptr=x, r_ptr=x, iz_ptr=acc, ir_ptr=acc, lab_ptr="*i32", rlab_ptr="*i32", c_ptr=acc,
                part_ptr=acc, q_ptr=acc, a_ptr=acc, b_ptr=acc, qc_ptr=acc, tiles_ptr="*i32", excl_ptr="*i32",
                softplus_ptr=acc, sigmoid_ptr=acc, de_ptr=acc, diz_ptr=acc, dr_ptr=acc, dir_ptr=acc, out_ptr=x,
                vz_ptr=x, vr_ptr=x, lanes_ptr=acc, sums_ptr=acc, dz_ptr=acc, **LOSS)


@contextlib.contextmanager
def gpu_configs():
    """Within the block, the kernels' configuration functions answer for a GPU even in a process that runs
    them interpreted (TRITON_INTERPRET=1, which they read at each call)."""
    interpreting = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if interpreting is not None:
            os.environ["TRITON_INTERPRET"] = interpreting


def label_config(dtype: str, D: int = 128) -> dict:
    """The label kernels' default GPU configuration for width D (metaug_fast/kernels/label.config)."""
    import torch

    from metaug_fast.kernels import label

    with gpu_configs():
        return label.config(torch.empty(0, D, dtype=getattr(torch, dtype)), D).meta()


def _row_space(module: str, kernel: str, dtype: str) -> List[dict]:
    """Every configuration a score-mode kernel autotunes over in ``dtype`` (its ``space``, or ``space_fp64``:
    kernels/_common.tuned)."""
    tuner = getattr(importlib.import_module(f"metaug_fast.kernels.{module}"), kernel)
    space = tuner.space_fp64 if dtype == "float64" else tuner.space
    return [dict(BLOCK_B=bb, BLOCK_K=bk, num_warps=w) for bb, bk, w in space]


def jobs() -> List[Job]:
    """Every specialization checked: each kernel in fp32, bf16 and fp64, the forms that change its code."""
    from metaug_fast.contract import Form
    from metaug_fast.kernels import label
    from metaug_fast.kernels._common import HINGE, INFONCE, MARGIN, WEIGHTED

    ids = [int(f) for f in Form if f != Form.MARGIN]  # every loss form: a new one is compiled too
    out = []
    for dtype in ("float32", "bfloat16", "float64"):
        forms = ids if dtype == "bfloat16" else (int(HINGE), int(WEIGHTED), int(INFONCE))
        for form in forms:
            for masks in ((True, True), (False, False)) if form == int(WEIGHTED) else ((True, True),):
                flags = dict(FORM=form, HAS_PM=masks[0], HAS_NM=masks[1])
                names = ["_score_fwd_kernel", "_score_bwd_kernel"] + ["_score_bwd_bwd_kernel"] * (form != int(HINGE))
                out += [Job("score", name, dtype, {**flags, **blocks}) for name in names
                        for blocks in _row_space("score", name, dtype)]
        for name in ("_margin_fwd_kernel", "_margin_bwd_kernel", "_margin_injection_fwd_kernel",
                     "_margin_injection_bwd_kernel"):
            out += [Job("margins", name, dtype, dict(HAS_PM=True, HAS_NM=False, **blocks))
                    for blocks in _row_space("margins", name, dtype)]
        cfg = label_config(dtype)
        fwd = label.Config(**cfg).forward_meta()
        for form in (ids + [int(MARGIN)]) if dtype == "bfloat16" else (int(WEIGHTED), int(MARGIN)):
            out.append(Job("label", "_label_fwd_kernel", dtype, dict(FORM=form, SIM=0, **fwd)))
            if form == int(INFONCE):
                out.append(Job("label", "_label_positives_kernel", dtype, dict(SIM=0, **fwd)))
            # TWO_WAY: self mode's single row kernel (every self-mode call, and every Triton HVP); with the
            # column kernel, cross mode (InfoNCE).
            for two_way in (False, True) if form != int(MARGIN) else (False,):
                out.append(Job("label", "_label_bwd_rows_kernel", dtype,
                               dict(SIM=0, **label.rows_meta(label.Config(**cfg), form, two_way))))
            for two_way in (False, True) if form == int(INFONCE) else (False,):
                out.append(Job("label", "_label_bwd_cols_kernel", dtype,
                               dict(SIM=0, **label.cols_meta(label.Config(**cfg), form, two_way))))
        if dtype != "bfloat16":  # cross mode's column kernel in this dtype's configuration
            out.append(Job("label", "_label_bwd_cols_kernel", dtype,
                           dict(SIM=0, **label.cols_meta(label.Config(**cfg), int(INFONCE), True))))
        if dtype == "bfloat16":  # every tile shape a GPU run may sweep must compile without spills too
            for fields in label.CANDIDATES[1:]:
                alt = {**cfg, **fields}
                out.append(Job("label", "_label_fwd_kernel", dtype,
                               dict(FORM=int(WEIGHTED), SIM=0, **label.Config(**alt).forward_meta())))
                out += [Job("label", "_label_bwd_rows_kernel", dtype,
                            dict(SIM=0, **label.rows_meta(label.Config(**alt), int(WEIGHTED), two_way)))
                        for two_way in (False, True)]
                for form, two_way in ((int(WEIGHTED), False), (int(INFONCE), True)):
                    out.append(Job("label", "_label_bwd_cols_kernel", dtype,
                                   dict(SIM=0, **label.cols_meta(label.Config(**alt), form, two_way))))
        sim = {k: v for k, v in fwd.items() if k not in ("FORM",)}
        out.append(Job("similarity", "_similarity_kernel", dtype, dict(SIM=1, **sim)))
    # fp16's label kernels, every form: its backward scales G per row before the cast (kernels/label.py,
    # _grad_dot), in tiles of its own. Its score kernels are bf16's with another load type.
    cfg = label.Config(**label_config("float16"))
    for form in ids + [int(MARGIN)]:
        out.append(Job("label", "_label_fwd_kernel", "float16", dict(FORM=form, SIM=0, **cfg.forward_meta())))
        for two_way in (False, True) if form != int(MARGIN) else (False,):
            out.append(Job("label", "_label_bwd_rows_kernel", "float16", dict(SIM=0, **label.rows_meta(cfg, form,
                                                                                                     two_way))))
        for two_way in (False, True) if form == int(INFONCE) else (False,):
            out.append(Job("label", "_label_bwd_cols_kernel", "float16", dict(SIM=0, **label.cols_meta(cfg, form,
                                                                                                     two_way))))
    # The fused second derivative (kernels/label_hvp.py) in its bf16 (tensor-core), fp32 and fp64 tiles, every
    # form with a Hessian in bf16 and fp32, with and without a cotangent on the reference rows.
    import torch

    from metaug_fast.contract import HVP_FORMS
    from metaug_fast.kernels import label_hvp

    # Their tiles do not depend on D beyond 128 (wider rows take more feature steps and output chunks).
    for dtype in ("bfloat16", "float32", "float64"):
        with gpu_configs():
            tiles = label_hvp.tiles(getattr(torch, dtype), 128)
        prec = dict(PREC="tf32" if dtype == "bfloat16" else "ieee", UPCAST=False, EVEN_D=tiles["SPLIT"])
        sums = dict(BM=tiles["BM"], BN=tiles["sums_BN"], BD=tiles["BD"], SPLIT=tiles["SPLIT"],
                    num_warps=tiles["sums_warps"])
        tiles = {k: v for k, v in tiles.items() if not k.startswith("sums_")}
        for form in HVP_FORMS if dtype != "float64" else (WEIGHTED, INFONCE):
            for with_r in (False, True):
                flags = dict(FORM=int(form), WITH_R=with_r, **prec)
                out += [Job("label_hvp", "_hvp_sums_kernel", dtype, {**flags, **sums}),
                        Job("label_hvp", "_hvp_out_kernel", dtype, {**flags, **tiles, "BY_COLS": False}),
                        Job("label_hvp", "_hvp_out_kernel", dtype, {**flags, **tiles, "BY_COLS": True})]
    # The second derivative's IEEE GEMM on CUDA (kernels/matmul.py), in its fp32 and fp64 tiles.
    from metaug_fast.kernels import matmul

    for dtype in ("float32", "float64"):
        for has_c in (False, True):
            out.append(Job("matmul", "_mm_kernel", dtype, dict(HAS_C=has_c, **matmul.tiles(getattr(torch, dtype)))))
    # Every other width's configuration, in the half dtypes whose tiles depend on it.
    for dtype in ("bfloat16", "float16"):
        for D in WIDTHS:
            cfg = label.Config(**label_config(dtype, D))
            for form in (int(WEIGHTED), int(MARGIN)):
                out.append(Job("label", "_label_fwd_kernel", dtype, dict(FORM=form, SIM=0, **cfg.forward_meta()), D))
            for form, two_way in ((int(WEIGHTED), False), (int(WEIGHTED), True), (int(MARGIN), False)):
                out.append(Job("label", "_label_bwd_rows_kernel", dtype,
                               dict(SIM=0, **label.rows_meta(cfg, form, two_way)), D))
            for form, two_way in ((int(WEIGHTED), False), (int(INFONCE), True), (int(MARGIN), False)):
                out.append(Job("label", "_label_bwd_cols_kernel", dtype,
                               dict(SIM=0, **label.cols_meta(cfg, form, two_way)), D))
    return out


def compile_job(job: Job, arch: int = 90, **options):
    """The compiled kernel (triton's CompiledKernel: ``asm`` holds ttir…ptx/cubin, ``n_regs``, ``n_spills``,
    ``metadata.shared``) of one specialization, with its launcher's options unless ``options`` say else."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"metaug_fast.kernels.{job.module}")
    kernel = getattr(mod, job.kernel)
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    params = list(inspect.signature(jit.fn).parameters)
    constexprs = {k: v for k, v in job.constexprs.items() if k not in LAUNCH_OPTIONS}
    attrs = {}
    if job.module in LABEL_MODULES + ("similarity",):
        # As a launch on contiguous [N, 128] rows specializes them: unit feature strides become constexpr 1,
        # and pointers, D and the row strides are known multiples of 16 (vectorized loads).
        constexprs = {**{k: 1 for k in ("s_ed", "s_rd") if k in params}, **constexprs}
        attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params
                 if p not in constexprs and (p.endswith("_ptr") or p in ("D", "s_eb", "s_rb"))}
    types = _types(job.dtype)
    signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    src = ASTSource(fn=jit, signature=signature, constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    opts = {**getattr(mod, "COMPILE_OPTIONS", {}), **{k: v for k, v in job.constexprs.items() if k in LAUNCH_OPTIONS}}
    opts.update(options)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def toolkit_binary(name: str) -> str:
    """A CUDA toolkit program (ptxas, nvdisasm, cuobjdump): Triton's bundled copy, else the PATH's."""
    import shutil

    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.access(bundled, os.X_OK) else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (neither bundled with Triton nor on the PATH)")
    return found


def resources(compiled, arch: int = 90) -> Dict[str, int]:
    """Registers, stack frame, spill stores/loads (bytes per thread, from ptxas -v on the kernel's PTX, as
    Triton's own build ran it) and shared memory (bytes per program) of a compiled kernel."""
    import re
    import subprocess
    import tempfile

    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        run = subprocess.run([toolkit_binary("ptxas"), f"-arch={target}", "-v", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True)
    text = run.stdout + run.stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if run.returncode or not frame or not regs:
        raise RuntimeError(f"ptxas -v gave no resource usage: {text[-500:]}")
    return dict(registers=int(regs.group(1)), stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)), shared=int(compiled.metadata.shared))


def contractible(ptx: str) -> int:
    """How many floating-point multiplies, adds and subtracts of ``ptx`` may be fused into FMAs: those
    without an explicit rounding mode (``mul.f32``, not ``mul.rn.f32``), which ptxas may contract. Triton
    emits every one with ``.rn`` (and no contracted ``fma``) when compiled with ``enable_fp_fusion=False``;
    the FMAs that remain then come from the math library's own polynomials (log, exp)."""
    import re

    return len(re.findall(r"^\s*(?:mul|add|sub)\.f(?:16|32|64)\b", ptx, flags=re.M))


# The kernels whose cancellation-critical products go through kernels/_common.mul_rn.
PINNED = ("_score_bwd_bwd_kernel",)


def pinned(ptx: str) -> int:
    """How many products of ``ptx`` are rounded on their own whatever the compile options (``mul.rn``, as
    kernels/_common.mul_rn's inline PTX gives them): with contraction on, every other product is a ``mul.f32``
    or an ``fma``."""
    import re

    return len(re.findall(r"^\s*mul\.rn\.f(?:32|64)\b", ptx, flags=re.M))


def check(job: Job, arch: int) -> List[str]:
    """The failures of one specialization: compile errors, fused multiply-adds in a score kernel (or critical
    products left unpinned), spills, a label kernel at the register cap or over the shared-memory budget."""
    try:
        compiled = compile_job(job, arch)
    except Exception as exc:  # noqa: BLE001 (the report names the specialization)
        return [f"{job.label()}: {exc}"]
    failures = []
    if "cubin" not in compiled.asm:
        failures.append(f"{job.label()}: no cubin")
    if job.module in ("score", "margins") and contractible(compiled.asm["ptx"]):
        failures.append(f"{job.label()}: {contractible(compiled.asm['ptx'])} multiplies/adds may be fused into FMAs")
    first = _row_space(job.module, job.kernel, job.dtype)[0] if job.kernel in PINNED else None
    if first and all(job.constexprs[k] == v for k, v in first.items()):
        # As torch.compile before torch 2.14 builds it: the launch option dropped, contraction on.
        fused = compile_job(job, arch, enable_fp_fusion=True)
        if not pinned(fused.asm["ptx"]):
            failures.append(f"{job.label()}: no product stays rounded on its own (mul.rn) when compiled with "
                            "enable_fp_fusion=True, as torch.compile before torch 2.14 does")
    from metaug_fast.contract import Form

    # The fused HVP compiles with contraction on: its cancelling products must be mul.rn of their own.
    if job.module == "label_hvp" and job.constexprs["FORM"] != int(Form.INFONCE) and not pinned(compiled.asm["ptx"]):
        failures.append(f"{job.label()}: the Hessian's cancelling products are not mul.rn")
    used = resources(compiled, arch)
    tuned_for = arch == TUNED_ARCH
    if used["spill_stores"] and tuned_for:
        failures.append(f"{job.label()}: {used['spill_stores']} bytes of registers spilled per thread")
    if job.module in LABEL_MODULES:
        threads = 32 * job.constexprs.get("num_warps", 4)
        cap = min(255, 65536 // threads)  # registers a thread may hold at this block size
        if used["registers"] >= cap and tuned_for:
            failures.append(f"{job.label()}: {used['registers']} registers per thread, at the cap of {cap} for "
                            f"{threads} threads")
        if used["shared"] > SHARED_BUDGET.get(arch, SHARED_BUDGET[90]):
            failures.append(f"{job.label()}: {used['shared']} bytes of shared memory, over sm_{arch}'s "
                            f"{SHARED_BUDGET.get(arch, SHARED_BUDGET[90])}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    todo = [job for job in jobs() if args.arch == TUNED_ARCH or job.module in LABEL_MODULES + ("similarity", "matmul")]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        failures = [f for fs in pool.map(check, todo, [args.arch] * len(todo)) for f in fs]
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    checked = ("compile, FMA in score kernels, spills, label kernels at the register cap or over the shared-memory "
               "budget" if args.arch == TUNED_ARCH else "compile, shared memory over budget")
    print(f"Triton: {len(todo)} kernel specializations compiled to sm_{args.arch} cubins in "
          f"{time.perf_counter() - t0:.0f} s; {len(failures)} failures ({checked})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
