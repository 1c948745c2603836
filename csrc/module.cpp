// Python entry point of metaug_fast._C. The module is empty: importing it loads the shared library,
// whose static TORCH_LIBRARY registrations make the ops available as torch.ops.metaug_fast.*.
#include <Python.h>

#include "build_info.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "metaug_fast CPU kernels (registered as torch.ops.metaug_fast)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
