// Helpers for the C shims through which a native program (an AOTInductor package) calls tpcompile's ops
// (cpu_ops.cpp, quant_ops.cpp; declared for the compiler in cpu_ops.C_SHIMS / quant.C_SHIMS).
// Invariant: a shim calls its op through the dispatcher, typed, so the kernel that runs and what a
// profiler records are exactly those of the boxed call AOTInductor's proxy executor would make (at ~1 us
// instead of ~8); the package resolves the shims when it loads, so their library is loaded RTLD_GLOBAL.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

namespace tpcompile_shim {

inline const at::Tensor& tensor_of(AtenTensorHandle handle) {
  return *torch::aot_inductor::tensor_handle_to_tensor_pointer(handle);
}

// An optional tensor argument: AOTInductor passes a pointer to the handle, or nullptr for None.
inline c10::optional<at::Tensor> optional_tensor(AtenTensorHandle* handle) {
  return handle ? c10::optional<at::Tensor>(tensor_of(*handle)) : c10::nullopt;
}

inline AtenTensorHandle handle_of(at::Tensor&& tensor) {
  return torch::aot_inductor::new_tensor_handle(std::move(tensor));
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace tpcompile_shim
