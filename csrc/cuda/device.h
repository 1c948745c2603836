// How the CUDA ops (score.cu, label.cu) reach their device: kernel launches, the current stream, the device guard and
// the check that a tensor lives there, as the op bodies' backend. Compiled by nvcc, that is the GPU; compiled as host C++ with
// METAUG_SIMT_EMULATION (csrc/cuda/simt/oucl_cuda_simt.cpp), the same kernels run on CPU tensors under the
// SIMT emulator of simt/simt.h, so they are tested where no GPU is lent.
#pragma once

#include <ATen/ATen.h>

#ifdef METAUG_SIMT_EMULATION
#include "simt/simt.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace metaug_fast {
namespace device {

#ifdef METAUG_SIMT_EMULATION
constexpr const char* kName = "CPU, SIMT emulation of CUDA";
struct Guard {
  explicit Guard(c10::Device) {}
};
inline bool holds(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream() { return nullptr; }
using simt::launch;
#else
constexpr const char* kName = "CUDA";
using Guard = c10::cuda::CUDAGuard;
inline bool holds(const at::Tensor& t) { return t.is_cuda(); }
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

// kernel<<<grid, block, 0, stream>>>(args...), then the launch error check.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// The CUDA device as the backend of the op bodies of oucl_host.h.
struct Backend {
  static constexpr const char* kName = "cuda";
  static constexpr const char* kDevice = device::kName;
  using Guard = device::Guard;
  static bool check_device(const at::Tensor& t) { return holds(t); }
};

}  // namespace device
}  // namespace metaug_fast
