// 16-float vectors shared by the C++ kernel libraries (cpu_ops.cpp, quant_ops.cpp): GCC vector extensions
// that become one AVX-512 register on hosts that have it and two AVX2 registers on those that do not.
// Invariant: hsum adds the 16 lanes in lane order, so a kernel's fp32 sums have one fixed order everywhere.
#pragma once

#include <cstring>

namespace tpcompile_simd {

typedef float v16f __attribute__((vector_size(64)));

// 16 consecutive floats from any address (no alignment needed).
inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of the 16 lanes, first to last.
inline float hsum(v16f v) {
  float s = 0.0f;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}

}  // namespace tpcompile_simd
