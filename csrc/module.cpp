// The Python module stub of bitfast's native extensions (bitfast._C and bitfast._C_cuda).
//
// The module itself holds nothing: importing it loads the shared library, which runs the
// static TORCH_LIBRARY_IMPL registrations of the kernels compiled into it (each op registers
// its own, in its csrc/cpu/<op>.cpp, csrc/cuda/<op>_register.cpp and csrc/autograd/<op>.cpp).
// The op schemas are defined once, in Python (each bitfast/ops/<op>.py), so no pybind11 is
// needed here.
#include <Python.h>

#ifndef BITFAST_MODULE_NAME
#error "BITFAST_MODULE_NAME must be defined (_C or _C_cuda)"
#endif

#define BITFAST_CONCAT_(a, b) a##b
#define BITFAST_CONCAT(a, b) BITFAST_CONCAT_(a, b)
#define BITFAST_STR_(a) #a
#define BITFAST_STR(a) BITFAST_STR_(a)

// The fingerprint of the op schemas this build was compiled against (setup.py writes the
// header). bitfast._native finds this string in the library file and refuses to load a
// build made for other schemas: its registrations would abort the process at import.
#ifdef BITFAST_HAVE_SCHEMA_TAG
#include "generated/schema_tag.h"
#else
#define BITFAST_SCHEMA_TAG "none"
#endif
extern "C" __attribute__((used, visibility("default"))) const char bitfast_schema_tag[] =
    "bitfast-schema-tag:" BITFAST_SCHEMA_TAG;

static struct PyModuleDef bitfast_module = {
    PyModuleDef_HEAD_INIT,
    BITFAST_STR(BITFAST_MODULE_NAME),
    "bitfast native kernels; importing this module registers them with torch.library",
    -1,
    nullptr,
};

PyMODINIT_FUNC BITFAST_CONCAT(PyInit_, BITFAST_MODULE_NAME)(void) {
  return PyModule_Create(&bitfast_module);
}
