// Python entry point of metaug_fast._C_cuda: loading it registers the CUDA kernels of the ops that
// metaug_fast._C defines (import metaug_fast._C first).
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                      "metaug_fast CUDA kernels (torch.ops.metaug_fast, CUDA dispatch key)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
