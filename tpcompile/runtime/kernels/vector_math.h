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

// Sixteen hsums at once: lane j of the result is hsum(v[j]) bit for bit (the same tree: lanes i + i + 8,
// then i + i + 4, i + i + 2, then the pair), with ~3 shuffles and adds per vector instead of ~8 for one
// hsum: an attention step reduces one key's dot product per 16 lanes of it. The shuffles below leave the
// sum of the vector taken i-th in lane 4 (i % 4) + i / 4, so the vectors are taken in that order (the map
// is its own inverse) and each sum lands in its own lane.
constexpr int kHsum16Order[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

inline v16f hsum16(const v16f* v) {
  v16f r;
#if defined(__AVX512F__)
  __m512 h8[8], h4[4], h2[2];
  for (int p = 0; p < 8; p++) {  // [h8 of one vector | h8 of the next]
    __m512 a, b;
    std::memcpy(&a, &v[kHsum16Order[2 * p]], 64);
    std::memcpy(&b, &v[kHsum16Order[2 * p + 1]], 64);
    h8[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int p = 0; p < 4; p++)  // 128-bit chunk c: h4 of the vector taken (4p + c)-th
    h4[p] = _mm512_add_ps(_mm512_shuffle_f32x4(h8[2 * p], h8[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(h8[2 * p], h8[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int p = 0; p < 2; p++)  // chunk c: h2 of the vectors taken (8p + c)-th and (8p + 4 + c)-th
    h2[p] = _mm512_add_ps(_mm512_shuffle_ps(h4[2 * p], h4[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_ps(h4[2 * p], h4[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // chunk c: the sums of the vectors taken c-th, (c + 4)-th, (c + 8)-th and (c + 12)-th
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(h2[0], h2[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(h2[0], h2[1], _MM_SHUFFLE(3, 1, 3, 1)));
  std::memcpy(&r, &sums, 64);
#elif defined(__AVX__)
  // the same tree on 32-byte halves: each vector's h8 is one add of its halves, no shuffle
  __m256 h8[8][2], h4[4][2], h2[2][2];
  for (int p = 0; p < 8; p++)
    for (int q = 0; q < 2; q++) {
      const v16f& a = v[kHsum16Order[2 * p + q]];
      h8[p][q] = a.part[0] + a.part[1];
    }
  for (int p = 0; p < 4; p++)
    for (int q = 0; q < 2; q++) {
      const __m256 lo = h8[2 * p + q][0], hi = h8[2 * p + q][1];
      h4[p][q] = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  for (int p = 0; p < 2; p++)
    for (int q = 0; q < 2; q++)
      h2[p][q] = _mm256_add_ps(_mm256_shuffle_ps(h4[2 * p][q], h4[2 * p + 1][q], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm256_shuffle_ps(h4[2 * p][q], h4[2 * p + 1][q], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int q = 0; q < 2; q++)
    r.part[q] = _mm256_add_ps(_mm256_shuffle_ps(h2[0][q], h2[1][q], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm256_shuffle_ps(h2[0][q], h2[1][q], _MM_SHUFFLE(3, 1, 3, 1)));
#else
  alignas(16) float out[16];
  for (int j = 0; j < 16; j++) out[j] = hsum(v[j]);
  r = load16(out);
#endif
  return r;
}

// exp of each lane of a GCC float vector (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 series
// in r, times 2^n): within ~2 ulp of exp, and 0 below -87 (where exp is within a few ulp of FLT_MIN), -inf
// included. Lane-wise operations only, so every ISA's registers give the same bits.
template <typename F>
inline F exp_lanes(F x) {
  typedef int I __attribute__((vector_size(sizeof(F))));
  const I zero_below = x < -87.0f;
  x = x < -87.0f ? F{} - 87.0f : x;
  const F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2): 1.5 * 2^23 trick
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const I scale_bits = (__builtin_convertvector(n, I) + 127) << 23;  // 2^n, n in [-126, 128]
  const F result = y * reinterpret_cast<const F&>(scale_bits);
  return zero_below ? F{} : result;
}

inline v16f exp16(const v16f& x) {
#if defined(__AVX512F__)
  return exp_lanes(x);
#else
  v16f r;
  for (int p = 0; p < kParts; p++) r.part[p] = exp_lanes(x.part[p]);
  return r;
#endif
}

// s in every lane.
inline v16f splat16(float s) { return v16f{} + s; }

// The larger of each pair of lanes.
inline v16f max16(const v16f& a, const v16f& b) {
#if defined(__AVX512F__)
  return a > b ? a : b;
#else
  v16f r;
  for (int p = 0; p < kParts; p++) r.part[p] = a.part[p] > b.part[p] ? a.part[p] : b.part[p];
  return r;
#endif
}

}  // namespace tpcompile_simd
