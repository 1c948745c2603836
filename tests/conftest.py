"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the
package is imported, to run Triton kernels on CPU tensors.
"""
import contextlib
import os
import time
from datetime import timedelta

os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist each worker gets its share of the cores (make test: 2 workers, 2 cores, one thread each),
# it and the processes it starts: OpenMP threads that outnumber the cores spin against each other, and the
# training tests then took 2-4 times as long as alone. Tests that compare thread counts set them themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                     // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

import pytest  # noqa: E402  (after TRITON_INTERPRET and the thread count are set)
import torch  # noqa: E402  (after TRITON_INTERPRET and the thread count are set)
import torch.distributed as dist  # noqa: E402  (after TRITON_INTERPRET and the thread count are set)

import metaug_fast  # noqa: E402  (after TRITON_INTERPRET and the thread count are set)
from bench.gpu_check import DEADLINE_ENV, DEADLINE_REASON  # noqa: E402  (after TRITON_INTERPRET and the thread count are set)
from metaug_fast.distributed import shutdown  # noqa: E402  (after TRITON_INTERPRET and the thread count are set)

# CI must not skip the C++ tests because the build broke: only an explicit METAUG_NO_EXT=1 allows it.
if os.environ.get("METAUG_NO_EXT", "0") != "1" and "cpp" not in metaug_fast.available_backends():
    raise RuntimeError(
        "the C++ extension did not load (set METAUG_NO_EXT=1 to test without it): "
        f"{metaug_fast.backends.cpp.ERROR}"
    )

requires_cpp = pytest.mark.skipif(
    "cpp" not in metaug_fast.available_backends(), reason="C++ extension not built (METAUG_NO_EXT=1)"
)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: the sanitizer run must really be selected
def pytest_collection_modifyitems(config, items):
    """The emulated CUDA kernels' tests run once. Where test_kernels_stay_in_bounds is selected and gcc's
    AddressSanitizer runtime is installed, that test runs them all in a subprocess with the kernels built
    with the sanitizer, so here they are skipped; that subprocess (METAUG_SIMT_ASAN=1) collects them alone."""
    from backends import ASAN, ASAN_TEST, asan_preload, runs_emulated_kernels

    if ASAN:
        keep, drop = [], []
        for item in items:
            (keep if runs_emulated_kernels(item) else drop).append(item)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    elif any(item.nodeid.endswith(ASAN_TEST) for item in items) and asan_preload() is not None:
        skip = pytest.mark.skip(reason=f"run under AddressSanitizer by {ASAN_TEST}")
        for item in items:
            if runs_emulated_kernels(item):
                item.add_marker(skip)


# The GPU check (bench/gpu_check.py) gives each pytest run a wall-clock deadline (seconds since the epoch,
# the same for every xdist worker): tests not started by then are reported as skipped, so the run always
# ends by itself and writes its junit file instead of being killed with nothing to show.
_DEADLINE = float(os.environ.get(DEADLINE_ENV, "inf"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if time.time() > _DEADLINE:
        pytest.skip(DEADLINE_REASON)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str, seconds: float = 60):
    """A gloo process group for a spawned test worker: left with a barrier (metaug_fast.distributed.shutdown)
    after a normal run, torn down at once after an error (the other ranks may never reach a barrier)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=seconds))
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown()
