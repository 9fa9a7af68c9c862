// The Python functions of csrc/replay_program.cpp, for the _C module's table (csrc/ops.cpp).
#pragma once

#include <Python.h>

namespace resnet_fast {

PyObject* replay_program(PyObject*, PyObject* args);
PyObject* replay_run(PyObject*, PyObject* args);

}  // namespace resnet_fast
