// Operator schemas of the resnet_fast namespace: the one contract every
// backend implements. Kernels register per device in csrc/cpu and csrc/cuda;
// fake (meta) kernels and autograd formulas are registered from Python
// (resnet_fast/ops.py).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/cpu_ops.h"
#include "resnet_fast.h"
#include "replay_checks.h"
#include "replay_program.h"

namespace {

// _C.set_activations_known_finite(known: bool) -> bool, the previous value:
// a network forward vouches (on this thread) that the activations its
// layers see are finite, having checked its input once (see
// resnet_fast/finite.py and csrc/cpu/conv.cpp).
PyObject* set_activations_known_finite(PyObject*, PyObject* arg) {
  const int known = PyObject_IsTrue(arg);
  if (known < 0) return nullptr;
  const bool previous = resnet_fast::cpu::activations_known_finite();
  resnet_fast::cpu::set_activations_known_finite(known != 0);
  return PyBool_FromLong(previous);
}

// _C.enter_activation_memory() / _C.exit_activation_memory(): the CPU
// forward between them runs on activation memory kept from the previous one
// (csrc/cpu/activation_memory.cpp, resnet_fast/cpu_memory.py).
PyObject* enter_activation_memory(PyObject*, PyObject*) {
  resnet_fast::cpu::enter_activation_memory();
  Py_RETURN_NONE;
}

PyObject* exit_activation_memory(PyObject*, PyObject*) {
  if (!resnet_fast::cpu::exit_activation_memory()) {
    PyErr_SetString(PyExc_RuntimeError, "resnet_fast: exit_activation_memory without enter_activation_memory");
    return nullptr;
  }
  Py_RETURN_NONE;
}

// _C.release_activation_memory() -> int: frees the kept blocks, returns their bytes.
PyObject* release_activation_memory(PyObject*, PyObject*) {
  return PyLong_FromSize_t(resnet_fast::cpu::release_activation_memory());
}

// _C.cached_activation_memory() -> int: the bytes of the blocks kept now.
PyObject* cached_activation_memory(PyObject*, PyObject*) {
  return PyLong_FromSize_t(resnet_fast::cpu::cached_activation_memory());
}

// _C.empty_from_activation_memory(like, sizes) -> Tensor: an uninitialised
// contiguous CPU tensor of like's dtype and the given sizes whose memory comes
// from that cache and returns to it when freed, in a forward or not.
PyObject* empty_from_activation_memory(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* like = nullptr;
  PyObject* sizes_object = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &like, &sizes_object)) return nullptr;
  if (!THPVariable_Check(like)) {
    PyErr_SetString(PyExc_TypeError, "resnet_fast: empty_from_activation_memory takes a tensor and a tuple of sizes");
    return nullptr;
  }
  const at::Tensor& tensor = THPVariable_Unpack(like);
  PyObject* sequence = PySequence_Fast(sizes_object, "resnet_fast: empty_from_activation_memory sizes must be a sequence");
  if (sequence == nullptr) return nullptr;
  std::vector<int64_t> sizes;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(sequence); ++i) {
    sizes.push_back(PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sequence, i)));
    if (sizes.back() == -1 && PyErr_Occurred()) {
      Py_DECREF(sequence);
      return nullptr;
    }
  }
  Py_DECREF(sequence);
  TORCH_CHECK(tensor.device().is_cpu(), "resnet_fast: empty_from_activation_memory makes CPU tensors, got a tensor on ",
              tensor.device());
  return THPVariable_Wrap(resnet_fast::cpu::empty_from_activation_memory(sizes, tensor.options(),
                                                                         at::MemoryFormat::Contiguous));
  END_HANDLE_TH_ERRORS
}

using resnet_fast::CudaConvFamily;

thread_local CudaConvFamily preferred_family = CudaConvFamily::kAuto;

struct FamilyName {
  CudaConvFamily family;
  const char* name;
};
constexpr FamilyName kFamilyNames[] = {{CudaConvFamily::kCutlassSm90, "cutlass_sm90"},
                                       {CudaConvFamily::kCutlassSm80, "cutlass_sm80"},
                                       {CudaConvFamily::kCudnn, "cudnn"},
                                       {CudaConvFamily::kCudnnFused, "cudnn_fused"}};

// _C.set_cuda_conv_family(name: str | None) -> str | None, the previous
// preference: the CUDA convolution family conv_bias_act prefers on this
// thread (None: choose by itself). See resnet_fast/ops.py, cuda_conv_family.
PyObject* set_cuda_conv_family(PyObject*, PyObject* arg) {
  CudaConvFamily family = CudaConvFamily::kAuto;
  if (arg != Py_None) {
    const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
    if (name == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "the CUDA convolution family must be a str or None");
      return nullptr;
    }
    bool known = false;
    for (const FamilyName& entry : kFamilyNames) {
      if (std::strcmp(entry.name, name) == 0) {
        family = entry.family;
        known = true;
      }
    }
    if (!known) {
      PyErr_Format(PyExc_ValueError,
                   "resnet_fast: unknown CUDA convolution family '%s'; expected cutlass_sm90, cutlass_sm80, cudnn, "
                   "cudnn_fused or None",
                   name);
      return nullptr;
    }
  }
  const CudaConvFamily previous = preferred_family;
  preferred_family = family;
  for (const FamilyName& entry : kFamilyNames)
    if (entry.family == previous) return PyUnicode_FromString(entry.name);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_activations_known_finite", set_activations_known_finite, METH_O,
     "Vouch (True) or stop vouching (False) that the activations reaching the CPU conv_bias_act on this thread "
     "are finite; returns the previous setting."},
    {"set_cuda_conv_family", set_cuda_conv_family, METH_O,
     "Prefer a CUDA convolution family for conv_bias_act on this thread ('cutlass_sm90', 'cutlass_sm80', "
     "'cudnn', 'cudnn_fused'; None: automatic); returns the previous preference."},
    {"enter_activation_memory", enter_activation_memory, METH_NOARGS,
     "Begin a CPU forward on activation memory kept from the previous one (pair with exit_activation_memory)."},
    {"exit_activation_memory", exit_activation_memory, METH_NOARGS,
     "End it: blocks no allocation took during the whole forward are freed."},
    {"release_activation_memory", release_activation_memory, METH_NOARGS,
     "Free the activation memory kept for the next CPU forward; returns its bytes."},
    {"cached_activation_memory", cached_activation_memory, METH_NOARGS,
     "The bytes of activation memory kept for the next CPU forward."},
    {"empty_from_activation_memory", empty_from_activation_memory, METH_VARARGS,
     "empty_from_activation_memory(like, sizes): an uninitialised contiguous CPU tensor of like's dtype whose "
     "memory comes from the kept activation memory and returns to it when freed."},
    {"source_marks", resnet_fast::source_marks, METH_VARARGS,
     "source_marks(tables, names, held, tensors): marks of what each tables[i][names[i]] holds (held[i]) and of "
     "each tensor's version counter and data address (not inference tensors), now."},
    {"sources_unchanged", resnet_fast::sources_unchanged, METH_O,
     "Whether everything source_marks marked is as it was."},
    {"module_walk", resnet_fast::module_walk, METH_VARARGS,
     "module_walk(network, known_types, block_types, also_known): the modules below network, depth first, where "
     "none has a hook of its own and each has a type in known_types, is an instance of block_types or passes "
     "also_known(module); else None."},
    {"replay_program", resnet_fast::replay_program, METH_VARARGS,
     "replay_program(calls, size, outputs): a recorded CPU forward (cpu_replay._Program's calls) for replay_run, "
     "each operator's arguments besides its activations converted once."},
    {"replay_run", resnet_fast::replay_run, METH_VARARGS,
     "replay_run(program, x, callables): the recorded forward run on x, its step and module calls taken from "
     "callables in order; the list of its outputs."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

namespace resnet_fast {
CudaConvFamily preferred_cuda_conv_family() { return preferred_family; }
}  // namespace resnet_fast

// Importing resnet_fast._C runs the static registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "resnet_fast compiled operators", -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resnet_fast, m) {
  // y = act(conv(x, weight) + bias + residual); NHWC (channels_last) output.
  m.def(
      "conv_bias_act(Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  // The same written into residual, for inference on the CPU (no CUDA
  // kernel, no autograd): saves the output's allocation. Returns nothing,
  // so that functionalization (torch.compile) can handle the mutation.
  m.def(
      "conv_bias_act_(Tensor(a!) residual, Tensor x, Tensor weight, Tensor bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> ()");
  // A 3x3 stride-1 padding-1 convolution weight transformed for
  // conv3x3_winograd_bias_act ([36, C, K]); CPU float32, finite weights only.
  m.def("winograd_weight(Tensor weight) -> Tensor");
  // conv_bias_act of a 3x3 stride-1 padding-1 convolution by Winograd's
  // F(4x4, 3x3), for CPU inference (no CUDA kernel, no autograd); weight
  // serves operands with NaN or Inf, which take the direct convolution.
  m.def(
      "conv3x3_winograd_bias_act(Tensor x, Tensor weight, Tensor weight_winograd, Tensor bias, Tensor? residual, "
      "bool relu) -> Tensor");
  // The same written into residual (as conv_bias_act_ is).
  m.def(
      "conv3x3_winograd_bias_act_(Tensor(a!) residual, Tensor x, Tensor weight, Tensor weight_winograd, "
      "Tensor bias, bool relu) -> ()");
  // Max pooling for CPU inference (no CUDA kernel, no autograd): NHWC output,
  // no indices.
  m.def(
      "max_pool2d_nhwc(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> Tensor");
  // The same written into out (a slice of a batch's result, say).
  m.def(
      "max_pool2d_nhwc_into(Tensor(a!) out, Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> ()");
  // Whether x holds no NaN and no Inf (CPU).
  m.def("all_finite(Tensor x) -> bool");
  // The mean over H and W for CPU inference (no CUDA kernel, no autograd):
  // [N, C], adaptive_avg_pool2d(x, 1) flattened.
  m.def("global_avg_pool_nhwc(Tensor x) -> Tensor");
  // The fused epilogue alone: act(y + bias[c] + residual), NHWC output.
  m.def("bias_act(Tensor y, Tensor bias, Tensor? residual, bool relu) -> Tensor");
  // Backward of bias_act: grad_z = grad_out masked by out > 0 (empty when
  // relu is false, since it then equals grad_out), grad_bias = sum of grad_z
  // over N, H, W (fp32).
  m.def("bias_act_backward(Tensor grad_out, Tensor out, bool relu) -> (Tensor grad_z, Tensor grad_bias)");
  // Training BatchNorm with batch statistics, then + residual, then ReLU.
  // Returns the output, the batch mean and 1/sqrt(var + eps) (saved for
  // backward) and the biased batch variance (for the running-stat update,
  // which the caller applies). Statistics are fp32, shape [C].
  m.def(
      "bn_act_train(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps, bool relu) "
      "-> (Tensor out, Tensor save_mean, Tensor save_invstd, Tensor batch_var)");
  // Fused backward of bn_act_train: dReLU (mask from out), d residual
  // (= grad_z; empty when relu is false), d gamma, d beta, d input.
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor x, Tensor out, Tensor weight, Tensor save_mean, "
      "Tensor save_invstd, bool relu) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_z)");
}
