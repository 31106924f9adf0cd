// Importing finetune_ext._C loads this library, which runs the static TORCH_LIBRARY_IMPL registrations
// of every kernel. The schemas live in finetune_ext/ops/_library.py; this module exposes no functions.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
