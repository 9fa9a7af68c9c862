// The checks a replayed CPU forward (resnet_fast/cpu_replay.py) makes on
// every call, in C++: for a ResNet-50 the walk over its 150 modules and the
// 265 parameters and buffers its folded weights were made from. Done by the
// Python interpreter these took 0.2 and 0.4-0.5 ms of a 14 ms bfloat16
// forward at batch 1 on a 2-core Xeon, the objects being out of cache after
// the forward before; here, 0.15 and 0.07-0.1 ms.
//
// _C.source_marks(tables, names, held, tensors) -> marks and
// _C.sources_unchanged(marks) -> bool: whether each tables[i][names[i]] is
// still the object held[i], and each of `tensors` still has the version
// counter and data address it had when marked (folding.HeldSources).
//
// _C.module_walk(network, known_types, block_types, also_known) -> list or
// None: the modules below network (models.module_path.known_modules).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <utility>
#include <vector>

#include "replay_checks.h"

namespace resnet_fast {

namespace {

struct SourceMarks {
  // Strong references, released with the marks (under the GIL: a capsule's destructor).
  std::vector<PyObject*> tables, names, held;
  std::vector<at::Tensor> tensors;
  std::vector<uint32_t> versions;
  std::vector<const void*> addresses;

  ~SourceMarks() {
    for (auto* list : {&tables, &names, &held})
      for (PyObject* object : *list) Py_DECREF(object);
  }
};

constexpr const char* kCapsuleName = "resnet_fast.source_marks";

// Tensor.data_ptr()'s address, without its checks (null for a tensor without data).
const void* address_of(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (!impl->has_storage() || impl->storage().data() == nullptr) return nullptr;
  return static_cast<const char*>(impl->storage().data()) + impl->storage_offset() * impl->itemsize();
}

void destroy_marks(PyObject* capsule) {
  delete static_cast<SourceMarks*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

}  // namespace

PyObject* source_marks(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* inputs[4];
  if (!PyArg_ParseTuple(args, "OOOO:source_marks", &inputs[0], &inputs[1], &inputs[2], &inputs[3])) return nullptr;
  struct Lists {  // new references to the inputs as lists or tuples, released on every way out
    PyObject* items[4] = {nullptr, nullptr, nullptr, nullptr};
    ~Lists() {
      for (PyObject* list : items) Py_XDECREF(list);
    }
  } lists;
  for (int i = 0; i < 4; ++i) {
    lists.items[i] = PySequence_Fast(inputs[i], "resnet_fast: source_marks takes four sequences");
    if (lists.items[i] == nullptr) return nullptr;
  }
  PyObject *tables = lists.items[0], *names = lists.items[1], *held = lists.items[2], *tensors = lists.items[3];
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(tables);
  if (PySequence_Fast_GET_SIZE(names) != count || PySequence_Fast_GET_SIZE(held) != count) {
    PyErr_SetString(PyExc_ValueError, "resnet_fast: source_marks: tables, names and held must have one item each");
    return nullptr;
  }
  auto marks = std::make_unique<SourceMarks>();
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* table = PySequence_Fast_GET_ITEM(tables, i);
    PyObject* name = PySequence_Fast_GET_ITEM(names, i);
    if (!PyDict_Check(table) || !PyUnicode_Check(name)) {
      PyErr_Format(PyExc_TypeError, "resnet_fast: source_marks: tables must be dicts and names str, got %s and %s "
                   "at %zd", Py_TYPE(table)->tp_name, Py_TYPE(name)->tp_name, i);
      return nullptr;
    }
    for (auto [list, object] : {std::pair{&marks->tables, table}, {&marks->names, name},
                                {&marks->held, PySequence_Fast_GET_ITEM(held, i)}}) {
      list->push_back(object);
      Py_INCREF(object);
    }
  }
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(tensors); ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(tensors, i);
    const char* problem = !THPVariable_Check(item)                 ? "not a tensor"
                          : THPVariable_Unpack(item).is_inference() ? "an inference tensor (no version counter)"
                                                                     : nullptr;
    if (problem != nullptr) {
      PyErr_Format(PyExc_TypeError, "resnet_fast: source_marks: tensors[%zd] is %s", i, problem);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    marks->tensors.push_back(t);
    marks->versions.push_back(t._version());
    marks->addresses.push_back(address_of(t));
  }
  PyObject* capsule = PyCapsule_New(marks.get(), kCapsuleName, destroy_marks);
  if (capsule != nullptr) marks.release();  // the capsule's now
  return capsule;
  END_HANDLE_TH_ERRORS
}

PyObject* sources_unchanged(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  if (!PyCapsule_IsValid(arg, kCapsuleName)) {
    PyErr_Format(PyExc_TypeError, "resnet_fast: sources_unchanged takes what source_marks returned, got %s",
                 Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  const auto* marks = static_cast<const SourceMarks*>(PyCapsule_GetPointer(arg, kCapsuleName));
  // No early exit: the loads of every item are independent, so the
  // processor overlaps their cache misses.
  bool unchanged = true;
  for (size_t i = 0; i < marks->tables.size(); ++i) {
    // Borrowed; a str key's hash is cached, so the lookup raises nothing.
    unchanged &= PyDict_GetItemWithError(marks->tables[i], marks->names[i]) == marks->held[i];
  }
  if (PyErr_Occurred()) return nullptr;
  for (size_t i = 0; i < marks->tensors.size(); ++i) {
    const at::Tensor& t = marks->tensors[i];
    unchanged &= t._version() == marks->versions[i];
    unchanged &= address_of(t) == marks->addresses[i];
  }
  return PyBool_FromLong(unchanged);
  END_HANDLE_TH_ERRORS
}

namespace {

// Whether module has a hook of its own (the four tables nn.Module keeps);
// -1 with an error set.
int has_hooks(PyObject* module) {
  static PyObject* const names[] = {PyUnicode_InternFromString("_forward_hooks"),
                                    PyUnicode_InternFromString("_forward_pre_hooks"),
                                    PyUnicode_InternFromString("_backward_hooks"),
                                    PyUnicode_InternFromString("_backward_pre_hooks")};
  for (PyObject* name : names) {
    PyObject* hooks = PyObject_GetAttr(module, name);
    if (hooks == nullptr) return -1;
    const int any = PyObject_IsTrue(hooks);
    Py_DECREF(hooks);
    if (any != 0) return any;
  }
  return 0;
}

// Whether module is one the walk accepts: its type one of known_types, an
// instance of block_types, or also_known(module) true. -1 with an error set.
int is_known(PyObject* module, PyObject* known_types, PyObject* block_types, PyObject* also_known) {
  const Py_ssize_t count = PyTuple_GET_SIZE(known_types);
  for (Py_ssize_t i = 0; i < count; ++i)
    if (PyTuple_GET_ITEM(known_types, i) == reinterpret_cast<PyObject*>(Py_TYPE(module))) return 1;
  const int block = PyObject_IsInstance(module, block_types);
  if (block != 0) return block;
  PyObject* verdict = PyObject_CallOneArg(also_known, module);
  if (verdict == nullptr) return -1;
  const int known = PyObject_IsTrue(verdict);
  Py_DECREF(verdict);
  return known;
}

}  // namespace

PyObject* module_walk(PyObject*, PyObject* args) {
  PyObject *network, *known_types, *block_types, *also_known;
  if (!PyArg_ParseTuple(args, "OO!OO:module_walk", &network, &PyTuple_Type, &known_types, &block_types,
                        &also_known))
    return nullptr;
  static PyObject* const modules_name = PyUnicode_InternFromString("_modules");
  // The same order as known_modules' Python loop: a stack, children pushed
  // in table order. Strong references: the checks may run Python code.
  struct Pending {
    std::vector<PyObject*> modules;
    ~Pending() {
      for (PyObject* module : modules) Py_DECREF(module);
    }
  } pending;
  PyObject* found = PyList_New(0);
  if (found == nullptr) return nullptr;
  auto push_children = [&](PyObject* module) -> bool {
    PyObject* children = PyObject_GetAttr(module, modules_name);
    if (children == nullptr) return false;
    if (!PyDict_Check(children)) {
      PyErr_Format(PyExc_TypeError, "resnet_fast: module_walk: %s._modules is a %s, not a dict",
                   Py_TYPE(module)->tp_name, Py_TYPE(children)->tp_name);
      Py_DECREF(children);
      return false;
    }
    Py_ssize_t position = 0;
    PyObject *key, *child;
    while (PyDict_Next(children, &position, &key, &child)) {
      if (child == Py_None) continue;
      Py_INCREF(child);
      pending.modules.push_back(child);
    }
    Py_DECREF(children);
    return true;
  };
  if (!push_children(network)) {
    Py_DECREF(found);
    return nullptr;
  }
  while (!pending.modules.empty()) {
    PyObject* module = pending.modules.back();
    pending.modules.pop_back();
    int refused = has_hooks(module);
    if (refused == 0) {
      const int known = is_known(module, known_types, block_types, also_known);
      refused = known < 0 ? -1 : !known;
    }
    const bool kept = refused == 0 && PyList_Append(found, module) == 0;
    Py_DECREF(module);  // found holds it now, or it is not needed
    if (!kept || !push_children(module)) {
      Py_DECREF(found);
      if (refused > 0) Py_RETURN_NONE;
      return nullptr;
    }
  }
  return found;
}

}  // namespace resnet_fast
