// The label ops' GEMMs (label.cu) in IEEE fp32/fp64 whatever torch's matmul flags say. at::mm on CUDA follows
// torch.backends.cuda.matmul.allow_tf32 and set_float32_matmul_precision("high"), which training scripts set
// for speed: TF32 keeps 10 mantissa bits (about 1e-3 relative), the whole tolerance of an fp32 Hessian-vector
// product, while the Triton backend's dots say IEEE. So the GEMMs go to cuBLAS directly with a pedantic compute
// type (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32, no reduced-precision reduction, whatever the handle's math mode).
// Setting torch's flags around the call is no option: torch 2.14 refuses a script that later reads them through
// the other API.
//
// Row-major tensors meet column-major cuBLAS through C^T = B^T·A^T: a row-major [r, c] operand is, read
// column-major, either its transpose (unit column stride: op N) or itself (unit row stride: op T). The SIMT
// emulator build runs the same translation against an emulated cublasGemmEx on the CPU (below), so the tests
// of csrc/cuda/simt check the operand orientation and leading dimensions too.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <utility>

#ifndef METAUG_SIMT_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#endif

namespace metaug_fast {
namespace device {

#ifdef METAUG_SIMT_EMULATION
enum GemmOp { kOpN, kOpT };

// cublasGemmEx's contract on the CPU: C [m, n] = op(A)·op(B) + beta·C, every matrix column-major at its
// pointer with its leading dimension; beta is 0 or 1.
template <typename T>
void gemm_ex(GemmOp op_a, GemmOp op_b, int m, int n, int k, const T* A, int lda, const T* B, int ldb, T beta, T* C,
             int ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto column_major = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, options);
  };
  const at::Tensor a = op_a == kOpN ? column_major(A, m, k, lda) : column_major(A, k, m, lda).t();
  const at::Tensor b = op_b == kOpN ? column_major(B, k, n, ldb) : column_major(B, n, k, ldb).t();
  at::Tensor c = column_major(C, m, n, ldc);
  if (beta == T(0)) c.copy_(at::mm(a, b));
  else c.add_(at::mm(a, b));
}
#else
using GemmOp = cublasOperation_t;
constexpr GemmOp kOpN = CUBLAS_OP_N, kOpT = CUBLAS_OP_T;

template <typename T>
void gemm_ex(GemmOp op_a, GemmOp op_b, int m, int n, int k, const T* A, int lda, const T* B, int ldb, T beta, T* C,
             int ldc) {
  constexpr bool fp64 = std::is_same<T, double>::value;
  const T alpha = 1;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), op_a, op_b, m, n, k, &alpha, A,
                                    fp64 ? CUDA_R_64F : CUDA_R_32F, lda, B, fp64 ? CUDA_R_64F : CUDA_R_32F, ldb, &beta,
                                    C, fp64 ? CUDA_R_64F : CUDA_R_32F, ldc,
                                    fp64 ? CUBLAS_COMPUTE_64F_PEDANTIC : CUBLAS_COMPUTE_32F_PEDANTIC,
                                    CUBLAS_GEMM_DEFAULT));
}
#endif

// A row-major [r, c] operand as a column-major view of its transpose: (op, leading dimension); a layout
// cuBLAS cannot read becomes a contiguous copy first.
inline std::pair<GemmOp, int64_t> transposed_view(at::Tensor& x) {
  const int64_t r = x.size(0), c = x.size(1);
  if (x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(1, c)) return {kOpN, x.stride(0)};
  if (x.stride(0) == 1 && x.stride(1) >= std::max<int64_t>(1, r)) return {kOpT, x.stride(1)};
  x = x.contiguous();
  return {kOpN, std::max<int64_t>(1, c)};
}

// out = a·b (accumulate false) or out += a·b, a [m, k], b [k, n], out [m, n], one dtype (fp32 or fp64).
inline void gemm(at::Tensor a, at::Tensor b, at::Tensor& out, bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(b.size(0) == k && out.size(0) == m && out.size(1) == n, "gemm: shapes do not chain");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == out.scalar_type(), "gemm: one dtype");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  TORCH_CHECK(std::max({m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0)}) <= INT_MAX,
              "gemm: a dimension or stride exceeds cuBLAS's int range");
  const bool direct = out.stride(1) == 1 && out.stride(0) >= n;  // C^T column-major with ld = out's row stride
  at::Tensor c = direct ? out : (accumulate ? out.contiguous() : at::empty({m, n}, out.options()));
  const auto [op_b, ldb] = transposed_view(b);  // cuBLAS's A: b^T [n, k]
  const auto [op_a, lda] = transposed_view(a);  // cuBLAS's B: a^T [k, m]
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "metaug_fast_gemm", [&] {
    gemm_ex<scalar_t>(op_b, op_a, int(n), int(m), int(k), b.data_ptr<scalar_t>(), int(ldb), a.data_ptr<scalar_t>(),
                      int(lda), scalar_t(accumulate ? 1 : 0), c.data_ptr<scalar_t>(), int(c.stride(0)));
  });
  if (!direct) out.copy_(c);
}

// a·b as a new contiguous [m, n] tensor.
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm(a, b, out, false);
  return out;
}

// out += a·b (out may be a view: narrow of a row-major tensor).
inline void addmm_(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { gemm(a, b, out, true); }

}  // namespace device
}  // namespace metaug_fast
