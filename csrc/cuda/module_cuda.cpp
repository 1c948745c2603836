// Python entry point of metaug_fast._C_cuda: loading it registers the CUDA kernels (score.cu, label.cu) of
// the ops that metaug_fast._C defines (import metaug_fast._C first).
#include <Python.h>
#include <torch/library.h>

#include "../build_info.h"

namespace metaug_fast {
void impl_score_ops(torch::Library& m);
void impl_label_ops(torch::Library& m);

TORCH_LIBRARY_IMPL(metaug_fast, CUDA, m) {
  impl_score_ops(m);
  impl_label_ops(m);
}
}  // namespace metaug_fast

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                      "metaug_fast CUDA kernels (torch.ops.metaug_fast, CUDA dispatch key)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
