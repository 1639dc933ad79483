// The Python extension module jaxbn._kernels._ffi: the FFI handlers as
// PyCapsules for jax.ffi.register_ffi_target, and what the build chose.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kernels.h"
#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* JaxbnShiftedSums(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxbnWeightedSums(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxbnShiftedAffine(XLA_FFI_CallFrame* call_frame);
}

namespace {

struct Target {
  const char* name;
  XLA_FFI_Error* (*handler)(XLA_FFI_CallFrame*);
};

constexpr Target kTargets[] = {
    {"jaxbn_shifted_sums", JaxbnShiftedSums},
    {"jaxbn_weighted_sums", JaxbnWeightedSums},
    {"jaxbn_shifted_affine", JaxbnShiftedAffine},
};

PyObject* Targets(PyObject*, PyObject*) {
  PyObject* targets = PyDict_New();
  if (targets == nullptr) return nullptr;
  for (const Target& target : kTargets) {
    PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(target.handler), nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(targets, target.name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(targets);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return targets;
}

PyObject* Isa(PyObject*, PyObject*) { return PyUnicode_FromString(jaxbn::Kernels().isa); }

PyObject* ThreadsUsed(PyObject*, PyObject*) { return PyLong_FromLongLong(jaxbn::ThreadsUsed()); }

PyObject* FfiApiVersion(PyObject*, PyObject*) {
  return Py_BuildValue("(ii)", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}

PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "The FFI handlers, {name: PyCapsule}."},
    {"isa", Isa, METH_NOARGS, "The instruction set the kernels run with on this CPU."},
    {"threads_used", ThreadsUsed, METH_NOARGS,
     "How many threads the latest kernel call with more than one task ran on."},
    {"ffi_api_version", FfiApiVersion, METH_NOARGS,
     "(major, minor) of the XLA FFI headers the kernels were built with."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_ffi", "jaxbn's compiled CPU kernels (XLA FFI handlers).", -1,
    kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__ffi() { return PyModule_Create(&kModule); }
