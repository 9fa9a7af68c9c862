// The loop of a replayed CPU forward (resnet_fast/cpu_replay.py), in C++.
//
// Run by the Python interpreter, each recorded call cost the loop's own
// bookkeeping and then torch.ops' conversion of its ten or so arguments
// (tensors, int lists, flags) into a stack of IValues: 0.15 ms of a 4.7 ms
// ResNet-18 bfloat16 forward at batch 1 on a 2-core Xeon, 0.4 ms of a 13 ms
// ResNet-50 one, outside the operators alone. Here each call's arguments
// other than its activations are converted once, when the program is made,
// and the operator is called through the dispatcher with that stack.
//
// _C.replay_program(calls, size, outputs) -> program: calls is a sequence of
//   (how, what, weights, tail, a, b, out, drop), as cpu_replay._Program keeps
//   them, with `what` the operator's (name, overload name) for how 0 and 1:
//     0: values[out] = op(values[a], *weights, values[b] or None, *tail)
//     1: op(values[b], values[a], *weights, *tail); values[out] = values[b]
//     2: values[out] = what(values[a], values[b] or None)  (a Python callable)
//     3: values[out] = what(values[a])                     (a Python callable)
//   then values[s] = None for s in drop. size: how many values; outputs: the
//   slots returned. Arguments the operator's schema would refuse raise
//   TypeError here, where nothing has run yet.
// _C.replay_run(program, x, callables) -> list: the values at `outputs` of a
//   run on x (values[0]), with the autograd keys excluded, as the Python
//   loop runs. callables: the `what` of the calls of kind 2 and 3, in order.
//
// The program holds no Python object: a recorded module call is often a
// bound method of the network that holds the program, and a capsule is
// opaque to Python's garbage collector, so that cycle would never be
// freed. The caller keeps the callables where the collector sees them.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "replay_program.h"

namespace resnet_fast {

namespace {

enum class How : int64_t { kOperator = 0, kOperatorIntoResidual = 1, kStep = 2, kModule = 3 };

struct Call {
  How how;
  std::optional<c10::OperatorHandle> op;
  Py_ssize_t callable = -1;          // for kStep and kModule: its index in replay_run's callables
  std::vector<c10::IValue> weights;  // between the input (and residual) and the tail
  std::vector<c10::IValue> tail;
  int64_t a, b, out;               // b < 0: no residual
  std::vector<int64_t> drop;
};

struct Program {
  std::vector<Call> calls;
  int64_t size;
  std::vector<int64_t> outputs;
  Py_ssize_t callables = 0;
};

constexpr const char* kCapsuleName = "resnet_fast.replay_program";

void destroy_program(PyObject* capsule) {
  delete static_cast<Program*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

[[noreturn]] void type_error(const std::string& message) {
  PyErr_SetString(PyExc_TypeError, ("resnet_fast: replay_program: " + message).c_str());
  throw python_error();
}

int64_t as_index(PyObject* object, int64_t size, const char* what, bool optional) {
  if (optional && object == Py_None) return -1;
  const long long value = PyLong_Check(object) ? PyLong_AsLongLong(object) : -1;
  if (PyErr_Occurred()) throw python_error();
  if (value < 0 || value >= size) type_error(std::string(what) + " must be a slot below size");
  return value;
}

// A new reference to the sequence's items (a list or a tuple).
struct Items {
  PyObject* fast;
  explicit Items(PyObject* sequence, const char* what) : fast(PySequence_Fast(sequence, what)) {
    if (fast == nullptr) throw python_error();
  }
  ~Items() { Py_DECREF(fast); }
  Py_ssize_t size() const { return PySequence_Fast_GET_SIZE(fast); }
  PyObject* operator[](Py_ssize_t i) const { return PySequence_Fast_GET_ITEM(fast, i); }
};

// A recorded argument as the IValue the operator's schema declares: a
// tensor, None, a bool, an int, or a sequence of ints.
c10::IValue as_ivalue(PyObject* object, const c10::Argument& argument) {
  c10::IValue value;
  if (object == Py_None) {
    value = c10::IValue();
  } else if (THPVariable_Check(object)) {
    value = THPVariable_Unpack(object);
  } else if (PyBool_Check(object)) {
    value = object == Py_True;
  } else if (PyLong_Check(object)) {
    const long long number = PyLong_AsLongLong(object);
    if (PyErr_Occurred()) throw python_error();
    value = static_cast<int64_t>(number);
  } else if (PyTuple_Check(object) || PyList_Check(object)) {
    Items items(object, "");
    std::vector<int64_t> numbers;
    for (Py_ssize_t i = 0; i < items.size(); ++i) {
      if (!PyLong_Check(items[i]) || PyBool_Check(items[i]))
        type_error("argument '" + argument.name() + "' holds a non-int");
      numbers.push_back(PyLong_AsLongLong(items[i]));
      if (PyErr_Occurred()) throw python_error();
    }
    value = c10::List<int64_t>(numbers);
  } else {
    type_error("argument '" + argument.name() + "' is a " + Py_TYPE(object)->tp_name);
  }
  if (!value.type()->isSubtypeOf(*argument.type()))
    type_error("argument '" + argument.name() + "' must be " + argument.type()->str() + ", got " +
               value.type()->str());
  return value;
}

// The operator of a recorded call, its weights and tail converted against
// its schema (which must take exactly the activations, weights and tail).
void bind_operator(Call& call, PyObject* what, PyObject* weights, PyObject* tail) {
  const char *name = nullptr, *overload = nullptr;
  if (!PyTuple_Check(what) || !PyArg_ParseTuple(what, "ss", &name, &overload)) {
    PyErr_Clear();
    type_error("an operator call names its operator as (name, overload name)");
  }
  call.op = c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
  const auto& arguments = call.op->schema().arguments();
  Items weight_items(weights, "resnet_fast: replay_program: weights must be a sequence");
  Items tail_items(tail, "resnet_fast: replay_program: tail must be a sequence");
  // x and the residual: one before the weights, one after them (kOperator) or both before (into the residual).
  const size_t first_weight = call.how == How::kOperator ? 1 : 2;
  const size_t first_tail = first_weight + weight_items.size() + (call.how == How::kOperator ? 1 : 0);
  if (arguments.size() != first_tail + tail_items.size())
    type_error(call.op->schema().name() + " takes " + std::to_string(arguments.size()) + " arguments, got " +
               std::to_string(first_tail + tail_items.size()));
  for (Py_ssize_t i = 0; i < weight_items.size(); ++i)
    call.weights.push_back(as_ivalue(weight_items[i], arguments[first_weight + i]));
  for (Py_ssize_t i = 0; i < tail_items.size(); ++i)
    call.tail.push_back(as_ivalue(tail_items[i], arguments[first_tail + i]));
}

Call make_call(PyObject* spec, int64_t size, Py_ssize_t& callables) {
  PyObject *how, *what, *weights, *tail, *a, *b, *out, *drop;
  if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 8)
    type_error("each call must be a tuple (how, what, weights, tail, a, b, out, drop)");
  if (!PyArg_ParseTuple(spec, "OOOOOOOO", &how, &what, &weights, &tail, &a, &b, &out, &drop)) throw python_error();
  Call call;
  const long kind = PyLong_Check(how) ? PyLong_AsLong(how) : -1;
  if (kind < 0 || kind > 3) type_error("how must be 0, 1, 2 or 3");
  call.how = static_cast<How>(kind);
  call.a = as_index(a, size, "a", false);
  call.b = as_index(b, size, "b", call.how != How::kOperatorIntoResidual);
  call.out = as_index(out, size, "out", false);
  Items drops(drop, "resnet_fast: replay_program: drop must be a sequence");
  for (Py_ssize_t i = 0; i < drops.size(); ++i) call.drop.push_back(as_index(drops[i], size, "drop", false));
  if (call.how == How::kOperator || call.how == How::kOperatorIntoResidual) {
    bind_operator(call, what, weights, tail);
  } else {
    if (!PyCallable_Check(what)) type_error("a step or module call needs a callable");
    call.callable = callables++;
  }
  return call;
}

const at::Tensor& tensor_at(const std::vector<c10::IValue>& values, int64_t slot) {
  TORCH_CHECK(values[slot].isTensor(), "resnet_fast: replay_run: slot ", slot, " holds no tensor");
  return values[slot].toTensor();
}

// Python's what(*args) on tensors, its result checked to be a tensor.
at::Tensor call_python(PyObject* what, std::initializer_list<const c10::IValue*> args) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(args.size()));
  if (tuple == nullptr) throw python_error();
  Py_ssize_t i = 0;
  for (const c10::IValue* arg : args) {
    PyObject* item = arg->isTensor() ? THPVariable_Wrap(arg->toTensor()) : (Py_INCREF(Py_None), Py_None);
    if (item == nullptr) {
      Py_DECREF(tuple);
      throw python_error();
    }
    PyTuple_SET_ITEM(tuple, i++, item);
  }
  PyObject* result = PyObject_Call(what, tuple, nullptr);
  Py_DECREF(tuple);
  if (result == nullptr) throw python_error();
  if (!THPVariable_Check(result)) {
    Py_DECREF(result);
    type_error("a recorded step or module returned something other than a tensor");
  }
  at::Tensor tensor = THPVariable_Unpack(result);
  Py_DECREF(result);
  return tensor;
}

// The operator on a stack, the GIL released meanwhile (as torch.ops does).
void call_operator(const c10::OperatorHandle& op, torch::jit::Stack& stack) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    op.callBoxed(&stack);
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

}  // namespace

PyObject* replay_program(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *calls, *size_object, *outputs;
  if (!PyArg_ParseTuple(args, "OOO:replay_program", &calls, &size_object, &outputs)) return nullptr;
  const long long size = PyLong_Check(size_object) ? PyLong_AsLongLong(size_object) : -1;
  if (PyErr_Occurred()) return nullptr;
  if (size < 1) type_error("size must be a positive int");
  auto program = std::make_unique<Program>();
  program->size = size;
  Items call_items(calls, "resnet_fast: replay_program: calls must be a sequence");
  for (Py_ssize_t i = 0; i < call_items.size(); ++i)
    program->calls.push_back(make_call(call_items[i], size, program->callables));
  Items output_items(outputs, "resnet_fast: replay_program: outputs must be a sequence");
  for (Py_ssize_t i = 0; i < output_items.size(); ++i)
    program->outputs.push_back(as_index(output_items[i], size, "an output", false));
  PyObject* capsule = PyCapsule_New(program.get(), kCapsuleName, destroy_program);
  if (capsule != nullptr) program.release();  // the capsule's now
  return capsule;
  END_HANDLE_TH_ERRORS
}

PyObject* replay_run(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *capsule, *x, *callables;
  if (!PyArg_ParseTuple(args, "OOO:replay_run", &capsule, &x, &callables)) return nullptr;
  if (!PyCapsule_IsValid(capsule, kCapsuleName))
    type_error(std::string("replay_run takes what replay_program returned, got ") + Py_TYPE(capsule)->tp_name);
  if (!THPVariable_Check(x)) type_error(std::string("replay_run takes a tensor, got ") + Py_TYPE(x)->tp_name);
  const auto* program = static_cast<const Program*>(PyCapsule_GetPointer(capsule, kCapsuleName));
  // A tuple the arguments hold: its items stay alive for the whole run.
  if (!PyTuple_Check(callables) || PyTuple_GET_SIZE(callables) != program->callables)
    type_error("replay_run takes the program's " + std::to_string(program->callables) +
               " step and module callables as a tuple");
  std::vector<c10::IValue> values(program->size);
  values[0] = THPVariable_Unpack(x);
  {
    at::AutoDispatchBelowAutograd below_autograd;  // no input needs a gradient (cpu_replay.replayable)
    torch::jit::Stack stack;
    for (const Call& call : program->calls) {
      const c10::IValue none;
      const c10::IValue& residual = call.b < 0 ? none : values[call.b];
      switch (call.how) {
        case How::kOperator:
          stack.clear();
          stack.push_back(tensor_at(values, call.a));
          stack.insert(stack.end(), call.weights.begin(), call.weights.end());
          stack.push_back(residual);
          stack.insert(stack.end(), call.tail.begin(), call.tail.end());
          call_operator(*call.op, stack);
          values[call.out] = std::move(stack.at(0));
          break;
        case How::kOperatorIntoResidual:
          stack.clear();
          stack.push_back(tensor_at(values, call.b));
          stack.push_back(tensor_at(values, call.a));
          stack.insert(stack.end(), call.weights.begin(), call.weights.end());
          stack.insert(stack.end(), call.tail.begin(), call.tail.end());
          call_operator(*call.op, stack);
          values[call.out] = values[call.b];
          break;
        case How::kStep:
          values[call.out] = call_python(PyTuple_GET_ITEM(callables, call.callable), {&values[call.a], &residual});
          break;
        case How::kModule:
          values[call.out] = call_python(PyTuple_GET_ITEM(callables, call.callable), {&values[call.a]});
          break;
      }
      for (int64_t slot : call.drop) values[slot] = c10::IValue();
    }
  }
  PyObject* result = PyList_New(static_cast<Py_ssize_t>(program->outputs.size()));
  if (result == nullptr) return nullptr;
  for (size_t i = 0; i < program->outputs.size(); ++i) {
    PyObject* item = THPVariable_Wrap(tensor_at(values, program->outputs[i]));
    if (item == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, static_cast<Py_ssize_t>(i), item);
  }
  return result;
  END_HANDLE_TH_ERRORS
}

}  // namespace resnet_fast
