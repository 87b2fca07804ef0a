// 16-float vectors shared by the C++ kernel libraries (cpu_ops.cpp, quant_ops.cpp), built from the host's
// own vector registers: one 64-byte register with AVX-512, two 32-byte ones with AVX/AVX2, four 16-byte
// ones otherwise (SSE, NEON).  GCC lowers a 64-byte vector type on a host without AVX-512 through the
// stack (every operation a store and reloads: a decode product at half the memory bandwidth), so on those
// hosts v16f is a struct of native vectors with the same operators.
// Invariants: every operation is lane-wise (lane i of v16f is float i of the 16 it was loaded from, on
// every host) and hsum adds the 16 lanes in one tree order, so a kernel's fp32 sums have one fixed order
// everywhere (a multiply-add becomes one FMA wherever the ISA has FMA, in either representation).
#pragma once

#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace tpcompile_simd {

#if defined(__AVX512F__)

typedef float v16f __attribute__((vector_size(64)));

#else

#if defined(__AVX__)
constexpr int kNativeLanes = 8;
#else
constexpr int kNativeLanes = 4;
#endif
typedef float native_f __attribute__((vector_size(kNativeLanes * 4)));
constexpr int kParts = 16 / kNativeLanes;

struct v16f {
  native_f part[kParts];

  float operator[](int i) const { return part[i / kNativeLanes][i % kNativeLanes]; }

  v16f& operator+=(const v16f& o) {
    for (int p = 0; p < kParts; p++) part[p] += o.part[p];
    return *this;
  }
};

inline v16f operator+(v16f a, const v16f& b) { return a += b; }

inline v16f operator*(const v16f& a, const v16f& b) {
  v16f r;
  for (int p = 0; p < kParts; p++) r.part[p] = a.part[p] * b.part[p];
  return r;
}

inline v16f operator*(float s, const v16f& a) {
  v16f r;
  for (int p = 0; p < kParts; p++) r.part[p] = s * a.part[p];
  return r;
}

inline v16f operator+(const v16f& a, float s) {
  v16f r;
  for (int p = 0; p < kParts; p++) r.part[p] = a.part[p] + s;
  return r;
}

inline v16f operator-(const v16f& a, float s) {
  v16f r;
  for (int p = 0; p < kParts; p++) r.part[p] = a.part[p] - s;
  return r;
}

static_assert(sizeof(v16f) == 64, "v16f holds exactly 16 floats, lane i at byte 4 * i");

#endif

// 16 consecutive floats from any address (no alignment needed).
inline v16f load16(const float* p) {
  v16f v;
#if defined(__AVX512F__)
  std::memcpy(&v, p, sizeof v);
#else
  for (int q = 0; q < kParts; q++) std::memcpy(&v.part[q], p + q * kNativeLanes, sizeof v.part[q]);
#endif
  return v;
}

// The 16 lanes to 16 consecutive floats at any address.
inline void store16(float* p, const v16f& v) {
#if defined(__AVX512F__)
  std::memcpy(p, &v, sizeof v);
#else
  for (int q = 0; q < kParts; q++) std::memcpy(p + q * kNativeLanes, &v.part[q], sizeof v.part[q]);
#endif
}

#if defined(__AVX__)
// hsum from its first sum h8 (lanes 0-7 plus lanes 8-15): a kernel that holds its 16 lanes as two 32-byte
// halves starts here (joining them into one 64-byte vector would go through memory).
inline float hsum8(__m256 h8) {
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}
#endif

// The sum of the 16 lanes as a tree: h8[i] = v[i] + v[i + 8], h4[i] = h8[i] + h8[i + 4], h2[i] = h4[i] +
// h4[i + 2], then h2[0] + h2[1].  Four vector additions instead of sixteen dependent scalar ones: a decode
// product reduces one row every ~600 weight bytes, where a serial sum costs a tenth of the bandwidth.
inline float hsum(const v16f& v) {
#if defined(__AVX__)
#if defined(__AVX512F__)
  __m512 z;
  std::memcpy(&z, &v, sizeof z);
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1));
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(z), high));
#else
  return hsum8(v.part[0] + v.part[1]);
#endif
#else
  float h[8];
  for (int i = 0; i < 8; i++) h[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; i++) h[i] = h[i] + h[i + 4];
  for (int i = 0; i < 2; i++) h[i] = h[i] + h[i + 2];
  return h[0] + h[1];
#endif
}

}  // namespace tpcompile_simd
