// The CUDA kernels of csrc/cuda (score.cu, label.cu) compiled as host C++ and run by the SIMT emulator (simt.h) on
// CPU tensors, registered as torch.ops.metaug_fast_simt.* with the schemas of torch.ops.metaug_fast.*: the
// autograd Functions take either namespace, so tests/test_cuda_simt.py checks these kernels against
// reference.py (values, gradients, Hessian-vector products) on a machine without a GPU. The label ops'
// cuBLAS GEMMs run on the CPU here through an emulated cublasGemmEx (gemm.h), behind the same row-major to
// column-major translation; everything else is the kernel source as nvcc compiles it.
#include "simt.h"

// Small label tiles, so that small tests cross several tiles and a ragged last one.
#define METAUG_LABEL_TILE_ELEMS int64_t(1024)
#define METAUG_SIMT_EMULATION 1
#include "../score.cu"
#include "../label.cu"

#include "../../op_schemas.h"

namespace metaug_fast {
namespace {

// Two deliberately broken launches, so the tests can check that the emulator rejects them:
// case 0, a lane returns before a full-mask shuffle its warp waits at; case 1, lanes reach different
// collectives. Any other case is a correct warp sum of the lane ids (496).
__global__ void broken_collective_kernel(int which, int64_t* out) {
  const int lane = threadIdx.x % kWarp;
  if (which == 0 && lane == 5) return;
  int64_t v = lane;
  if (which == 1 && lane == 7) v = __any_sync(0xffffffffu, 1);
  else v = warp_sum(v);
  if (lane == 0) *out = v;
}

int64_t simt_selftest(int64_t which) {
  int64_t out = -1;
  device::launch(broken_collective_kernel, dim3(1), dim3(kWarp), nullptr, static_cast<int>(which), &out);
  return out;
}

}  // namespace

TORCH_LIBRARY(metaug_fast_simt, m) {
  define_kernel_ops(m);
  m.def("selftest(int which) -> int", &simt_selftest);
}

TORCH_LIBRARY_IMPL(metaug_fast_simt, CPU, m) {
  impl_score_ops(m);
  impl_label_ops(m);
}

}  // namespace metaug_fast
