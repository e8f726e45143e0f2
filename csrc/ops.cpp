// Schemas of the native ops and the Python module sparsetrain._C that loads them (its functions: host_scan.cpp).
//
// sparsetrain_native::sgd_step_ / adam_step_ take the arguments of sparsetrain::sgd_step_ /
// adam_step_ (sparsetrain/ops.py) without ``backend``, with ``prune`` as its index in
// contract.PRUNE_MODES and ``stats_mask`` the statistics the call computes (contract.stats_computed:
// 0 when ``write_stats`` is False). The CPU driver (cpu_driver.cpp) and the CUDA driver (cuda_driver.cu)
// register their implementations for the CPU and CUDA dispatch keys; the Python backend
// sparsetrain.backends.native calls them.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef SPARSETRAIN_CUDA_ARCHS
#define SPARSETRAIN_CUDA_ARCHS ""
#endif

namespace {

std::string build_info() {
#if defined(SPARSETRAIN_WITH_CUDA)
  return std::string("cpu,cuda:") + SPARSETRAIN_CUDA_ARCHS;
#else
  return "cpu";
#endif
}

}  // namespace

TORCH_LIBRARY(sparsetrain_native, m) {
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, "
      "Tensor(d!)[] mask_words, Tensor(e!)[] stats, Tensor[] tensor_coefs, Tensor[] group_coefs, "
      "int[] group_inner, int[] shard_offsets, Tensor seeds, Tensor? found_inf, float lr, Tensor? lr_tensor, "
      "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, int prune, "
      "bool regularize, bool l1_proximal, int stats_mask) -> ()");
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor(f!)[] mask_words, Tensor(g!)[] stats, "
      "Tensor[] tensor_coefs, Tensor[] group_coefs, int[] group_inner, int[] shard_offsets, Tensor seeds, "
      "Tensor? found_inf, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled, bool amsgrad, bool maximize, int prune, bool regularize, bool l1_proximal, "
      "int stats_mask) -> ()");
  // "cpu" or "cpu,cuda:<architectures>": what this build contains
  m.def("build_info() -> str", &build_info);
}

PyMethodDef* sparsetrain_scan_methods();  // host_scan.cpp

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                 "sparsetrain's native drivers (ops in torch.ops.sparsetrain_native) and the list scans "
                                 "of sparsetrain.scan",
                                 -1, sparsetrain_scan_methods()};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
