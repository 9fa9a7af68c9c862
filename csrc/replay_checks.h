// The Python functions of csrc/replay_checks.cpp, for the _C module's table (csrc/ops.cpp).
#pragma once

#include <Python.h>

namespace resnet_fast {

PyObject* source_marks(PyObject*, PyObject* args);
PyObject* sources_unchanged(PyObject*, PyObject* marks);
PyObject* module_walk(PyObject*, PyObject* args);

}  // namespace resnet_fast
