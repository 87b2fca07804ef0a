// CPU kernels of tpcompile's quantized-weight ops (see quant.py): the weight stays in its packed block
// layout (GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K, and --quantize's int8 / int4_g32|64|128) and is
// decoded block by block while it streams through the product.
//
// quant_linear(x [.., K] f32, packed [N, K/32*bb] u8, bias?, format, K) -> [.., N] f32
//   - at most kDecodeRows activation rows (a decode step): every weight row is read once, each block
//     decoded in registers to the dequantized fp32 weights and multiplied into fp32 vector accumulators
//     (one per activation row); the output rows are spread over torch's intra-op threads;
//   - more rows (a prompt): the weight is decoded to fp32 in chunks of output rows, each chunk multiplied
//     with BLAS (at::mm).
// quant_embedding(packed [V, K/32*bb] u8, ids, format, K) -> [ids.., K] f32: the gathered rows decoded.
//
// `format | kRowsInterleaved` (Q8_0 / Q4_0 / Q4_1, int8 / int4_g32): the rows are interleaved in groups of 8
// (Q8_0) or 16 (nibbles; see decode_groups); a decode step then reads a group's blocks as one and needs no
// horizontal sum.
//
// Built with -O3 -march=native: GCC vector extensions become AVX-512 on hosts that have it and AVX2 (two
// registers per vector) on those that do not. Every weight a kernel decodes equals the reference
// dequantization (gguf.quants, fp32) bit for bit; products and sums are fp32, in one order per output
// element on every ISA and for any number of activation rows. The interleaved decode regroups the sum as
// d * sum(q * x) + m * sum(x) per block (a nibble row's sum(q * x) taken from whole bytes): equal to the
// dequantized product to fp32 round-off, not bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aoti_shim.h"
#include "vector_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kDecodeRows = 8;
constexpr int64_t kBlock = 32;
// The op's format code with this bit set: rows interleaved in groups (kernels/quant.py, interleave_rows; here
// group_rows).
constexpr int64_t kRowsInterleaved = 1 << 8;

// QuantFormat.code (format/quant_section.py), in the same order
enum Format : int64_t {
  Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q4_K = 3, Q5_K = 4, Q6_K = 5,
  INT8 = 6, INT4_G32 = 7, INT4_G64 = 8, INT4_G128 = 9,
};
constexpr int64_t kSuper = 256;  // weights per k-quant block

constexpr bool is_k_quant(int64_t format) { return format >= Q4_K && format <= Q6_K; }
// int4 groups of 64 / 128: f16 d, f16 m, then 2 / 4 Q4_1 nibble sub-blocks of 32 weights (16 bytes each)
constexpr bool is_group(int64_t format) { return format == INT4_G64 || format == INT4_G128; }

constexpr int64_t block_size(int64_t format) {
  return is_k_quant(format) ? kSuper : format == INT4_G64 ? 64 : format == INT4_G128 ? 128 : kBlock;
}

// int8 is stored in Q8_0's blocks and int4_g32 in Q4_1's: the same kernels run them.
constexpr int64_t kernel_format(int64_t format) {
  return format == INT8 ? Q8_0 : format == INT4_G32 ? Q4_1 : format;
}

using tpcompile_simd::hsum;
using tpcompile_simd::load16;
using tpcompile_simd::store16;
using tpcompile_simd::v16f;
typedef uint8_t v16u8 __attribute__((vector_size(16)));

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// 16 bytes (unsigned, or signed with kSigned) widened to 16 floats: explicit intrinsics, because GCC
// scalarizes __builtin_convertvector from bytes to floats.
template <bool kSigned>
inline v16f bytes_to_float(const uint8_t* p) {
  v16f r;
#if defined(__AVX512F__)
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m512i w = kSigned ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v);
  __m512 f = _mm512_cvtepi32_ps(w);
  std::memcpy(&r, &f, sizeof r);
#elif defined(__AVX2__)
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));  // widened straight from memory
  __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8));
  __m256 a = _mm256_cvtepi32_ps(kSigned ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
  __m256 b = _mm256_cvtepi32_ps(kSigned ? _mm256_cvtepi8_epi32(h) : _mm256_cvtepu8_epi32(h));
  std::memcpy(&r.part[0], &a, 32);
  std::memcpy(&r.part[1], &b, 32);
#else
  float f[16];
  for (int i = 0; i < 16; i++) f[i] = kSigned ? float(int8_t(p[i])) : float(p[i]);
  r = load16(f);
#endif
  return r;
}


int64_t block_bytes(int64_t format) {
  switch (format) {
    case Q8_0: return 34;
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    case INT8: return 34;
    case INT4_G32: return 20;
    case INT4_G64: return 36;
    case INT4_G128: return 68;
  }
  TORCH_CHECK(false, "quant kernels: unknown format code ", format);
}

// A block's fp16 scale (at p) in fp32: in every lane of a vector where the ISA converts halves (AVX-512: 16
// lanes, AVX2 + F16C: 8), converted from a broadcast load, rather than by a scalar convert and a broadcast
// per block; a scalar elsewhere. The same float either way: the conversion is exact. On an AMD EPYC, with
// the AVX2 nibble widening below, Q4_1 decode products got ~8% faster in AVX-512 builds and ~18% in AVX2
// builds (bits unchanged).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
inline int16_t half_bits(const uint8_t* p) {
  int16_t h;
  std::memcpy(&h, p, 2);
  return h;
}
#endif
#if defined(__AVX512F__)
typedef __m512 Scale;
inline Scale scale_at(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_set1_epi16(half_bits(p))); }
inline v16f times(Scale d, const v16f& v) {
  v16f s;
  std::memcpy(&s, &d, sizeof s);
  return s * v;
}
#elif defined(__AVX2__) && defined(__F16C__)
typedef __m256 Scale;  // in all 8 lanes of each half of a v16f
inline Scale scale_at(const uint8_t* p) { return _mm256_cvtph_ps(_mm_set1_epi16(half_bits(p))); }
inline v16f times(Scale d, const v16f& v) {
  v16f r;
  for (int q = 0; q < 2; q++) r.part[q] = _mm256_mul_ps(d, v.part[q]);
  return r;
}
#else
typedef float Scale;
inline Scale scale_at(const uint8_t* p) { return half(p); }
inline v16f times(Scale d, const v16f& v) { return d * v; }
#endif

// The weights a nibble block stands for: w = d * q + m for q = 0..15 (Q4_1, int4; Q4_0 as m = -8 d, since
// d * (q - 8) = d * q - 8 d exactly). d * q is exact (an fp16 scale times a 4-bit integer), so each weight
// is the reference's value bit for bit. With AVX-512 the 16 values are computed once per block and looked
// up by each nibble (a permute per 16 weights instead of a widen, a convert and a multiply-add: ~15%
// faster decode products); otherwise d and m are kept.
struct NibbleTable {
#if defined(__AVX512F__)
  __m512 values;
#else
  Scale d, m;
#endif
};

// d and m of a Q4_1 / int4 group header (two f16 side by side) in fp32. AVX-512: converted together in one
// 128-bit register, then each broadcast (~4% faster Q4_1 decode products than two broadcast-and-converts;
// with AVX2 the two are ~4% faster, so it keeps them). The same floats either way.
inline void scale_pair(const uint8_t* header, Scale& d, Scale& m) {
#if defined(__AVX512F__)
  int32_t pair;
  std::memcpy(&pair, header, 4);
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(pair));
  d = _mm512_broadcastss_ps(dm);
  m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
#else
  d = scale_at(header);
  m = scale_at(header + 2);
#endif
}

// The table of a block whose f16 d is at `header` and f16 m right after it (kOffsetEight: m = -8 d, Q4_0).
template <bool kOffsetEight>
inline NibbleTable nibble_table(const uint8_t* header) {
  Scale d, m;
  if constexpr (kOffsetEight) {
    d = scale_at(header);
    m = d * -8.0f;
  } else {
    scale_pair(header, d, m);
  }
#if defined(__AVX512F__)
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return {_mm512_fmadd_ps(d, iota, m)};
#else
  return {d, m};
#endif
}

// The 32 weights of a nibble block (16 bytes: byte j holds weight j in its low nibble, j + 16 in its high
// one), by its table.
inline void nibble_weights(const uint8_t* qs, const NibbleTable& t, v16f& lo, v16f& hi) {
#if defined(__AVX512F__)
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  const __m512 l = _mm512_permutexvar_ps(q, t.values);  // reads the low 4 bits of each index
  const __m512 h = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t.values);
  std::memcpy(&lo, &l, sizeof lo);
  std::memcpy(&hi, &h, sizeof hi);
#elif defined(__AVX2__) && defined(__F16C__)
  // each 8 bytes widened once (straight from memory), both nibbles masked or shifted out of the wide lanes
  const __m256i fifteen = _mm256_set1_epi32(15);
  for (int q = 0; q < 2; q++) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * q)));
    lo.part[q] = _mm256_fmadd_ps(t.d, _mm256_cvtepi32_ps(_mm256_and_si256(b, fifteen)), t.m);
    hi.part[q] = _mm256_fmadd_ps(t.d, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), t.m);
  }
#else
  v16u8 q, l, h;
  std::memcpy(&q, qs, 16);
  l = q & (uint8_t)15;
  h = q >> (uint8_t)4;
  lo = t.d * bytes_to_float<false>(reinterpret_cast<const uint8_t*>(&l)) + t.m;
  hi = t.d * bytes_to_float<false>(reinterpret_cast<const uint8_t*>(&h)) + t.m;
#endif
}

// The 32 weights of a Q8_0 / Q4_0 / Q4_1 block in fp32, by the reference's exact expressions (gguf.quants):
// d * q is exact (an fp16 scale times a small integer), so every weight equals the dequantized one bit for bit.
template <int64_t F>
inline void weights(const uint8_t* blk, v16f& lo, v16f& hi) {
  if constexpr (F == Q8_0) {
    const Scale d = scale_at(blk);
    lo = times(d, bytes_to_float<true>(blk + 2));
    hi = times(d, bytes_to_float<true>(blk + 18));
  } else if constexpr (F == Q4_0) {
    nibble_weights(blk + 2, nibble_table<true>(blk), lo, hi);
  } else {
    nibble_weights(blk + 4, nibble_table<false>(blk), lo, hi);
  }
}

// The 8 six-bit scales and mins of a q4_k / q5_k block (llama.cpp's get_scale_min_k4).
// The weights of one row of a groupwise int4 format (int4_g64/g128: per group f16 d, f16 m, then g/32
// Q4_1 nibble sub-blocks): use(offset, lo, hi) gets each 32 consecutive weights from input offset `offset`
// as two 16-float halves, in input order.
template <int64_t F, typename Use>
inline void group_weights(const uint8_t* row, int64_t groups, int64_t group_bytes, Use use) {
  constexpr int64_t g = block_size(F);
  for (int64_t b = 0; b < groups; b++) {
    const uint8_t* gp = row + b * group_bytes;
    const NibbleTable table = nibble_table<false>(gp);
    for (int64_t s = 0; s < g / kBlock; s++) {
      v16f lo, hi;
      nibble_weights(gp + 4 + 16 * s, table, lo, hi);
      use(b * g + s * kBlock, lo, hi);
    }
  }
}

inline void scale_min_k4(int j, const uint8_t* q, int& d, int& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The 256 weights of a k-quant block in fp32, by gguf.quants' expressions (each d * q is exact or one
// rounding, as there).
template <int64_t F>
inline void super_weights(const uint8_t* b, float* out) {
  if constexpr (F == Q6_K) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half(b + 208);
    for (int e = 0; e < 256; e++) {
      const int h = e / 128, r = e % 128;
      const int lq = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
      const int hq = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
      const float q = float(int8_t(lq | (hq << 4)) - 32);
      out[e] = (d * float(sc[e / 16])) * q;
    }
  } else {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + (F == Q5_K ? 48 : 16);
    for (int j = 0; j < 8; j++) {
      int s, m;
      scale_min_k4(j, scales, s, m);
      const float dj = d * float(s), mj = dmin * float(m);
      const int shift = (j % 2) * 4;
      const uint8_t* g = qs + (j / 2) * 32;
      for (int i = 0; i < 32; i++) {
        int q = (g[i] >> shift) & 15;
        if constexpr (F == Q5_K) q |= ((qh[i] >> j) & 1) << 4;
        out[j * 32 + i] = dj * float(q) - mj;
      }
    }
  }
}

// y[m, o] = sum_k w[o, k] * x[m, k] for rows m < rows, outputs o in [begin, end): the products are the
// dequantized model's; only the order of the fp32 sum differs from a BLAS product.
template <int64_t F, int R>
void decode_rows_fixed(const uint8_t* w, int64_t row_bytes, const float* x, int64_t k, const float* bias,
                       float* y, int64_t n, int64_t begin, int64_t end) {
  // R (the activation rows) is a constant so that the accumulators stay in registers; two per row
  // (first and second half of each block) so that consecutive blocks do not wait on one FMA chain.
  const int64_t nb = k / block_size(F);
  const int64_t bb = row_bytes / nb;
  for (int64_t o = begin; o < end; o++) {
    const uint8_t* wr = w + o * row_bytes;
    v16f acc[R], acc2[R];
    for (int r = 0; r < R; r++) acc[r] = acc2[r] = v16f{};
    if constexpr (is_group(F)) {
      group_weights<F>(wr, nb, bb, [&](int64_t at, v16f lo, v16f hi) {
        for (int r = 0; r < R; r++) {
          acc[r] += lo * load16(x + r * k + at);
          acc2[r] += hi * load16(x + r * k + at + 16);
        }
      });
    }
    if constexpr (is_k_quant(F)) {
      alignas(64) float buf[kSuper];
      for (int64_t b = 0; b < nb; b++) {
        super_weights<F>(wr + b * bb, buf);
        for (int r = 0; r < R; r++) {
          const float* xb = x + r * k + b * kSuper;
          for (int c = 0; c < kSuper; c += 32) {
            acc[r] += load16(buf + c) * load16(xb + c);
            acc2[r] += load16(buf + c + 16) * load16(xb + c + 16);
          }
        }
      }
    }
    for (int64_t b = 0; b < nb && F <= Q4_1; b++) {
      v16f lo, hi;
      weights<F>(wr + b * bb, lo, hi);
      for (int r = 0; r < R; r++) {
        const float* xb = x + r * k + b * kBlock;
        acc[r] += lo * load16(xb);
        acc2[r] += hi * load16(xb + 16);
      }
    }
    for (int r = 0; r < R; r++) {
      float s = hsum(acc[r] + acc2[r]);
      y[r * n + o] = bias ? s + bias[o] : s;
    }
  }
}

template <int64_t F>
void decode_rows(const uint8_t* w, int64_t row_bytes, const float* x, int64_t rows, int64_t k,
                 const float* bias, float* y, int64_t n, int64_t begin, int64_t end) {
  switch (rows) {
    case 1: return decode_rows_fixed<F, 1>(w, row_bytes, x, k, bias, y, n, begin, end);
    case 2: return decode_rows_fixed<F, 2>(w, row_bytes, x, k, bias, y, n, begin, end);
    case 3: return decode_rows_fixed<F, 3>(w, row_bytes, x, k, bias, y, n, begin, end);
    case 4: return decode_rows_fixed<F, 4>(w, row_bytes, x, k, bias, y, n, begin, end);
    case 5: return decode_rows_fixed<F, 5>(w, row_bytes, x, k, bias, y, n, begin, end);
    case 6: return decode_rows_fixed<F, 6>(w, row_bytes, x, k, bias, y, n, begin, end);
    case 7: return decode_rows_fixed<F, 7>(w, row_bytes, x, k, bias, y, n, begin, end);
    case 8: return decode_rows_fixed<F, 8>(w, row_bytes, x, k, bias, y, n, begin, end);
  }
}

// -- rows interleaved (Q8_0 / Q4_0 / Q4_1, and int8 / int4_g32 in their blocks) ----------------------------
//
// Layout (kernels/quant.py, interleave_rows): the first n / G * G rows form groups of G = group_rows(F) rows
// (8 for Q8_0, 16 for the nibble formats); a group takes the bytes of its G rows and holds, block by block
// (G * bb bytes each), the G rows' f16 d, then (Q4_1) their G f16 m, then the quants, 8 bytes for each j < 32:
//   - Q8_0: weight j of the 8 rows;
//   - Q4_0 / Q4_1: weight j of row l in the low nibble of byte l, and of row l + 8 in its high nibble.
// The last n % G rows stay as they are. So one widening load gives weight j of 8 output rows in the 8 lanes of
// a vector (no horizontal sum), and the scales of 8 rows convert in one instruction. A nibble byte converted
// whole is q(l) + 16 q(l + 8): the block's sums of whole bytes and of low nibbles times the inputs give both
// rows' sums, the high row's as (bytes - lows) / 16, with two conversions and two multiply-adds per 16
// weights; with a row's two nibbles in one byte (the file's pairing) each byte also took a shift. A Q4_1
// decode product then takes ~1.7 ns per row block instead of ~2.0 in AVX2 builds, ~1.3 instead of ~1.5 in
// AVX-512 ones (bench/quant.py's probe: one core of an Intel Xeon, weight in cache).
//
// An output row sums d * (sum_j q_j * x_j) + m * (sum_j x_j) block by block: the dequantized model's weights
// d * q + m regrouped (m = 0 for Q8_0, -8 d for Q4_0), so the result agrees with the dequantized product to
// fp32 round-off (not bit for bit), and every row has one order of operations on every ISA and for any number
// of activation rows.

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// Output rows of a vector: one a lane.
constexpr int64_t kLanes = 8;

// Rows a group of format F holds: one a lane (Q8_0), or two (the nibble formats).
constexpr int64_t group_rows(int64_t F) { return F == Q8_0 ? kLanes : 2 * kLanes; }

// Where a group block's quants start: after its rows' f16 d, and (Q4_1) their f16 m.
constexpr int64_t group_quants_at(int64_t F) { return group_rows(F) * (F == Q4_1 ? 4 : 2); }

inline v8f splat8(float s) { return v8f{s, s, s, s, s, s, s, s}; }

// a * b + c rounded once, explicitly: which multiply-adds GCC contracts differs between functions, and every
// lane must have one order of operations.
inline v8f fma8(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
  return v8f(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
#else
  v8f r;
  for (int i = 0; i < 8; i++) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

// 8 bytes (unsigned, or signed with kSigned) widened to 8 int32 lanes.
template <bool kSigned>
inline v8i widen8(const uint8_t* p) {
  v8i r;
#if defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m256i w = kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  std::memcpy(&r, &w, sizeof r);
#else
  for (int i = 0; i < 8; i++) r[i] = kSigned ? int32_t(int8_t(p[i])) : int32_t(p[i]);
#endif
  return r;
}

// 8 consecutive f16 in fp32.
inline v8f halves8(const uint8_t* p) {
  v8f r;
#if defined(__F16C__)
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&r, &f, sizeof r);
#else
  for (int i = 0; i < 8; i++) r[i] = half(p + 2 * i);
#endif
  return r;
}

inline v8f to_float(v8i v) { return __builtin_convertvector(v, v8f); }

#if defined(__AVX512F__)
inline v8f halves_sum(__m512 v) {  // lanes 0-7 + lanes 8-15
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 sum = _mm256_add_ps(_mm512_castps512_ps256(v), high);
  v8f r;
  std::memcpy(&r, &sum, sizeof r);
  return r;
}

// x[j] in lanes 0-7 and x[j + 1] in lanes 8-15 (j even): from x8b (the block's inputs 8 times over each)
// with kRepeated, else by a permute of the block's inputs (x_low: inputs 0-15, x_high: 16-31).
template <bool kRepeated>
inline __m512 inputs_pair(int j, const float* x8b, __m512 x_low, __m512 x_high) {
  if constexpr (kRepeated) return _mm512_loadu_ps(x8b + kLanes * j);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i at = _mm512_add_epi32(halves, _mm512_set1_epi32(j % 16));
  return _mm512_permutexvar_ps(at, j < 16 ? x_low : x_high);
}
// Q8_0's sums of byte_block_sums for one activation row, two weights (j, j + 1) a 512-bit vector: chains
// c0 | c2 and c1 | c3 (lanes 0-7 | 8-15), lane for lane the same operations.
template <bool kRepeated>
inline v8f byte_dots16(const uint8_t* qs, const float* xb, const float* x8b) {
  __m512 x_low{}, x_high{}, c02{}, c13{};
  if constexpr (!kRepeated) x_low = _mm512_loadu_ps(xb), x_high = _mm512_loadu_ps(xb + 16);
#pragma GCC unroll 8
  for (int j = 0; j < 16; j += 2) {
    const __m512 lo = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + kLanes * j))));
    const __m512 hi = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + kLanes * (j + 16)))));
    const __m512 xl = inputs_pair<kRepeated>(j, x8b, x_low, x_high);
    const __m512 xh = inputs_pair<kRepeated>(j + 16, x8b, x_low, x_high);
    c02 = j == 0 ? _mm512_mul_ps(lo, xl) : _mm512_fmadd_ps(lo, xl, c02);
    c13 = j == 0 ? _mm512_mul_ps(hi, xh) : _mm512_fmadd_ps(hi, xh, c13);
  }
  return halves_sum(_mm512_add_ps(c02, c13));
}

// The nibble sums of nibble_block_sums for one activation row (lows, and whole bytes), two weights (j, j + 1)
// a 512-bit vector: even j in lanes 0-7, odd j in 8-15. A nibble's float is a lookup in 0..15 (the permute
// reads the low 4 bits) rather than a mask and a conversion.
template <bool kRepeated>
inline void nibble_dots16(const uint8_t* qs, const float* xb, const float* x8b, v8f& lows, v8f& bytes) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 x_low{}, x_high{}, cl{}, cb{};
  if constexpr (!kRepeated) x_low = _mm512_loadu_ps(xb), x_high = _mm512_loadu_ps(xb + 16);
#pragma GCC unroll 16
  for (int j = 0; j < 32; j += 2) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + kLanes * j)));
    const __m512 low = _mm512_permutexvar_ps(v, iota), whole = _mm512_cvtepi32_ps(v);
    const __m512 xj = inputs_pair<kRepeated>(j, x8b, x_low, x_high);
    cl = j == 0 ? _mm512_mul_ps(low, xj) : _mm512_fmadd_ps(low, xj, cl);
    cb = j == 0 ? _mm512_mul_ps(whole, xj) : _mm512_fmadd_ps(whole, xj, cb);
  }
  lows = halves_sum(cl), bytes = halves_sum(cb);
}
#endif

// Each of kRows activation rows' sums over a Q8_0 group block, from the block's weights at j as floats
// (weights(j)): four chains (even / odd j, first / second 16 weights), each in order of j, summed as
// (c0 + c1) + (c2 + c3).
template <int kRows, typename Weights>
inline void byte_chains(Weights weights, const float* const* xb, v8f* dots) {
  v8f c[kRows][4];
#pragma GCC unroll 8
  for (int j = 0; j < 16; j += 2) {
    const v8f lo0 = weights(j), hi0 = weights(j + 16), lo1 = weights(j + 1), hi1 = weights(j + 17);
    for (int r = 0; r < kRows; r++) {
      const float* x = xb[r];
      if (j == 0) {
        c[r][0] = lo0 * splat8(x[0]), c[r][1] = hi0 * splat8(x[16]);
        c[r][2] = lo1 * splat8(x[1]), c[r][3] = hi1 * splat8(x[17]);
      } else {
        c[r][0] = fma8(lo0, splat8(x[j]), c[r][0]), c[r][1] = fma8(hi0, splat8(x[j + 16]), c[r][1]);
        c[r][2] = fma8(lo1, splat8(x[j + 1]), c[r][2]), c[r][3] = fma8(hi1, splat8(x[j + 17]), c[r][3]);
      }
    }
  }
  for (int r = 0; r < kRows; r++) dots[r] = (c[r][0] + c[r][1]) + (c[r][2] + c[r][3]);
}

// One activation row's sums over a Q8_0 group block (quants qs; xb: the row's 32 inputs of the block; x8b: the
// same 8 times over each, or null): lane l gets sum_j q(l, j) x_j, in byte_chains' order. R rows at once.
template <int R>
inline void byte_block_sums(const uint8_t* qs, const float* const (&xb)[R], const float* const (&x8b)[R],
                            v8f (&dots)[R]) {
  (void)x8b;  // read by AVX-512 builds
#if defined(__AVX512F__)
  if constexpr (R <= 2) {
    for (int r = 0; r < R; r++) {
      dots[r] = x8b[r] ? byte_dots16<true>(qs, xb[r], x8b[r]) : byte_dots16<false>(qs, xb[r], nullptr);
    }
    return;
  }
#endif
  if constexpr (R <= 2) {  // decoded as used
    byte_chains<R>([&](int j) { return to_float(widen8<true>(qs + kLanes * j)); }, xb, dots);
  } else {  // decoded once into memory, then read by each activation row in byte_chains' order
    v8f q[4][8];  // weights j, j + 16, j + 1, j + 17 for even j
#pragma GCC unroll 8
    for (int j = 0; j < 16; j += 2) {
      q[0][j / 2] = to_float(widen8<true>(qs + kLanes * j));
      q[1][j / 2] = to_float(widen8<true>(qs + kLanes * (j + 16)));
      q[2][j / 2] = to_float(widen8<true>(qs + kLanes * (j + 1)));
      q[3][j / 2] = to_float(widen8<true>(qs + kLanes * (j + 17)));
    }
    for (int r = 0; r < R; r++) {
      const float* x = xb[r];
      v8f c0 = q[0][0] * splat8(x[0]), c1 = q[1][0] * splat8(x[16]);
      v8f c2 = q[2][0] * splat8(x[1]), c3 = q[3][0] * splat8(x[17]);
#pragma GCC unroll 8
      for (int j = 2; j < 16; j += 2) {
        c0 = fma8(q[0][j / 2], splat8(x[j]), c0), c1 = fma8(q[1][j / 2], splat8(x[j + 16]), c1);
        c2 = fma8(q[2][j / 2], splat8(x[j + 1]), c2), c3 = fma8(q[3][j / 2], splat8(x[j + 17]), c3);
      }
      dots[r] = (c0 + c1) + (c2 + c3);
    }
  }
}

// Each of kRows activation rows' sums over a nibble group block, from the block's weights at j as floats
// (weights(j, low, whole): the low nibbles, and the whole bytes): two chains a sum (even / odd j), each in
// order of j, summed as c_even + c_odd.
template <int kRows, typename Weights>
inline void nibble_chains(Weights weights, const float* const* xb, v8f* lows, v8f* bytes) {
  v8f c[kRows][4];  // lows even / odd j, bytes even / odd j
#pragma GCC unroll 16
  for (int j = 0; j < 32; j += 2) {
    v8f low0, whole0, low1, whole1;
    weights(j, low0, whole0), weights(j + 1, low1, whole1);
    for (int r = 0; r < kRows; r++) {
      const v8f x0 = splat8(xb[r][j]), x1 = splat8(xb[r][j + 1]);
      if (j == 0) {
        c[r][0] = low0 * x0, c[r][1] = low1 * x1, c[r][2] = whole0 * x0, c[r][3] = whole1 * x1;
      } else {
        c[r][0] = fma8(low0, x0, c[r][0]), c[r][1] = fma8(low1, x1, c[r][1]);
        c[r][2] = fma8(whole0, x0, c[r][2]), c[r][3] = fma8(whole1, x1, c[r][3]);
      }
    }
  }
  for (int r = 0; r < kRows; r++) lows[r] = c[r][0] + c[r][1], bytes[r] = c[r][2] + c[r][3];
}

// One activation row's sums over a nibble group block (as byte_block_sums): lane l gets lows = sum_j q(l, j)
// x_j and highs = sum_j q(l + 8, j) x_j = (sum_j byte(l, j) x_j - lows) / 16, each sum in nibble_chains'
// order. R rows at once.
template <int R>
inline void nibble_block_sums(const uint8_t* qs, const float* const (&xb)[R], const float* const (&x8b)[R],
                              v8f (&lows)[R], v8f (&highs)[R]) {
  (void)x8b;  // read by AVX-512 builds
  v8f bytes[R];
#if defined(__AVX512F__)
  if constexpr (R <= 2) {
    for (int r = 0; r < R; r++) {
      if (x8b[r]) {
        nibble_dots16<true>(qs, xb[r], x8b[r], lows[r], bytes[r]);
      } else {
        nibble_dots16<false>(qs, xb[r], nullptr, lows[r], bytes[r]);
      }
    }
  } else
#endif
  if constexpr (R <= 2) {  // decoded as used: 64 weight vectors do not fit in registers
    nibble_chains<R>(
        [&](int j, v8f& low, v8f& whole) {
          const v8i v = widen8<false>(qs + kLanes * j);
          low = to_float(v & 15), whole = to_float(v);
        },
        xb, lows, bytes);
  } else {  // decoded once into memory, then read by two activation rows at a time (one: ~2x slower)
    v8f low[32], whole[32];
#pragma GCC unroll 16
    for (int j = 0; j < 32; j++) {
      const v8i v = widen8<false>(qs + kLanes * j);
      low[j] = to_float(v & 15), whole[j] = to_float(v);
    }
    const auto decoded = [&](int j, v8f& l, v8f& b) { l = low[j], b = whole[j]; };
    for (int r = 0; r + 1 < R; r += 2) nibble_chains<2>(decoded, xb + r, lows + r, bytes + r);
    if constexpr (R % 2) nibble_chains<1>(decoded, xb + R - 1, lows + R - 1, bytes + R - 1);
  }
  for (int r = 0; r < R; r++) highs[r] = (bytes[r] - lows[r]) * splat8(0.0625f);
}

// y[m, o] for rows m < R and the output rows of groups [begin, end); xs[m * nb + b]: block b's sum of x[m];
// x8 (or null): each x[m, i] 8 times over (used by AVX-512 builds for R <= 2).
template <int64_t F, int R>
void decode_groups(const uint8_t* w, int64_t row_bytes, const float* x, const float* xs, const float* x8, int64_t k,
                   const float* bias, float* y, int64_t n, int64_t begin, int64_t end) {
  static_assert(F == Q8_0 || F == Q4_0 || F == Q4_1);
  constexpr int64_t G = group_rows(F), parts = G / kLanes;  // parts: lanes' rows l, l + 8 (nibbles)
  const int64_t bb = block_bytes(F), nb = k / kBlock;
  for (int64_t g = begin; g < end; g++) {
    const uint8_t* group = w + g * G * row_bytes;
    v8f acc[parts][R], acc_m[parts][R];
    for (int p = 0; p < parts; p++)
      for (int r = 0; r < R; r++) acc[p][r] = acc_m[p][r] = v8f{};
    for (int64_t b = 0; b < nb; b++) {
      const uint8_t* blk = group + b * G * bb;
      const uint8_t* qs = blk + group_quants_at(F);
      const float* xb[R];
      const float* x8b[R];
      for (int r = 0; r < R; r++) {
        xb[r] = x + r * k + b * kBlock;
        x8b[r] = x8 ? x8 + (r * k + b * kBlock) * kLanes : nullptr;
      }
      v8f dots[parts][R];  // each row's sum_j q_j * x_j
      if constexpr (F == Q8_0) {
        byte_block_sums<R>(qs, xb, x8b, dots[0]);
      } else {
        nibble_block_sums<R>(qs, xb, x8b, dots[0], dots[parts - 1]);
      }
      for (int p = 0; p < parts; p++) {
        const v8f d = halves8(blk + 2 * kLanes * p);
        for (int r = 0; r < R; r++) acc[p][r] = fma8(d, dots[p][r], acc[p][r]);
        if constexpr (F != Q8_0) {
          const v8f m = F == Q4_1 ? halves8(blk + 2 * G + 2 * kLanes * p) : d * -8.0f;
          for (int r = 0; r < R; r++) acc_m[p][r] = fma8(m, splat8(xs[r * nb + b]), acc_m[p][r]);
        }
      }
    }
    for (int p = 0; p < parts; p++) {
      const int64_t first = g * G + p * kLanes;
      for (int r = 0; r < R; r++) {
        v8f s = acc[p][r] + acc_m[p][r];
        if (bias) {
          v8f add;
          std::memcpy(&add, bias + first, sizeof add);
          s += add;
        }
        std::memcpy(y + r * n + first, &s, sizeof s);
      }
    }
  }
}

// The sum of a block's 32 inputs, in one fixed order.
inline float block_sum(const float* x) {
  v8f a, b, c, d;
  std::memcpy(&a, x, sizeof a), std::memcpy(&b, x + 8, sizeof b);
  std::memcpy(&c, x + 16, sizeof c), std::memcpy(&d, x + 24, sizeof d);
  const v8f s = (a + b) + (c + d);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Inputs (rows * in_features) up to which decode_groups gets them 8 times over (24 KiB: in the first-level
// cache beside the weights streaming through it; 2.5x slower per block when it spilled to the second level).
constexpr int64_t kRepeatedInputs = 768;

template <int64_t F>
void decode_groups(const uint8_t* w, int64_t row_bytes, const float* x, const float* xs, const float* x8,
                   int64_t rows, int64_t k, const float* bias, float* y, int64_t n, int64_t begin, int64_t end) {
  switch (rows) {
    case 1: return decode_groups<F, 1>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
    case 2: return decode_groups<F, 2>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
    case 3: return decode_groups<F, 3>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
    case 4: return decode_groups<F, 4>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
    case 5: return decode_groups<F, 5>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
    case 6: return decode_groups<F, 6>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
    case 7: return decode_groups<F, 7>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
    case 8: return decode_groups<F, 8>(w, row_bytes, x, xs, x8, k, bias, y, n, begin, end);
  }
}

// Output units [begin, end) of an interleaved weight: unit u < n / G is group u, unit n / G the rows after the
// last group (their file layout, decode_rows).
template <int64_t F>
void decode_interleaved(const uint8_t* w, int64_t row_bytes, const float* x, const float* xs, const float* x8,
                        int64_t rows, int64_t k, const float* bias, float* y, int64_t n, int64_t begin,
                        int64_t end) {
  const int64_t groups = n / group_rows(F), last = std::min(end, groups);
  if (begin < last) decode_groups<F>(w, row_bytes, x, xs, x8, rows, k, bias, y, n, begin, last);
  if (end > groups) decode_rows<F>(w, row_bytes, x, rows, k, bias, y, n, groups * group_rows(F), n);
}

template <int64_t F>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t k, float* out, int64_t begin, int64_t end) {
  const int64_t nb = k / block_size(F);
  const int64_t bb = row_bytes / nb;
  for (int64_t o = begin; o < end; o++) {
    const uint8_t* wr = w + o * row_bytes;
    float* dst = out + (o - begin) * k;
    if constexpr (is_k_quant(F)) {
      for (int64_t b = 0; b < nb; b++) super_weights<F>(wr + b * bb, dst + b * kSuper);
      continue;
    }
    if constexpr (is_group(F)) {
      group_weights<F>(wr, nb, bb, [&](int64_t at, v16f lo, v16f hi) {
        store16(dst + at, lo);
        store16(dst + at + 16, hi);
      });
      continue;
    }
    for (int64_t b = 0; b < nb; b++) {
      v16f lo, hi;
      weights<F>(wr + b * bb, lo, hi);
      store16(dst + b * kBlock, lo);
      store16(dst + b * kBlock + 16, hi);
    }
  }
}

// Rows [begin, end) of an interleaved weight in fp32 (the same values as dequant_rows on the rows before
// interleaving): rows of a group from their lane (and nibble), the last n % G rows as they are.
template <int64_t F>
void dequant_interleaved_rows(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k, float* out,
                              int64_t begin, int64_t end) {
  constexpr int64_t G = group_rows(F);
  const int64_t bb = block_bytes(F), nb = k / kBlock, grouped = n / G * G;
  for (int64_t o = begin; o < end; o++) {
    float* dst = out + (o - begin) * k;
    if (o >= grouped) {
      dequant_rows<F>(w, row_bytes, k, dst, o, o + 1);
      continue;
    }
    const int64_t row = o % G, lane = row % kLanes, shift = row / kLanes * 4;
    const uint8_t* group = w + (o - row) * row_bytes;
    for (int64_t b = 0; b < nb; b++) {
      const uint8_t* blk = group + b * G * bb;
      const uint8_t* qs = blk + group_quants_at(F) + lane;
      const float d = half(blk + 2 * row);
      float* wb = dst + b * kBlock;
      if constexpr (F == Q8_0) {
        for (int j = 0; j < 32; j++) wb[j] = d * float(int8_t(qs[kLanes * j]));
      } else {
        const float m = F == Q4_1 ? half(blk + 2 * G + 2 * row) : d * -8.0f;
        for (int j = 0; j < 32; j++) wb[j] = d * float((qs[kLanes * j] >> shift) & 15) + m;
      }
    }
  }
}

// A packed weight as an op names it: its kernel format, and whether its rows are interleaved.
struct Packed {
  int64_t format;
  bool interleaved;
};

// Rows [begin, end) of the n-row weight w in fp32.
void dequant_dispatch(Packed p, const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k, float* out,
                      int64_t begin, int64_t end) {
  if (p.interleaved) {
    switch (p.format) {
      case Q8_0: return dequant_interleaved_rows<Q8_0>(w, row_bytes, n, k, out, begin, end);
      case Q4_0: return dequant_interleaved_rows<Q4_0>(w, row_bytes, n, k, out, begin, end);
      case Q4_1: return dequant_interleaved_rows<Q4_1>(w, row_bytes, n, k, out, begin, end);
    }
  }
  switch (p.format) {
    case Q8_0: return dequant_rows<Q8_0>(w, row_bytes, k, out, begin, end);
    case Q4_0: return dequant_rows<Q4_0>(w, row_bytes, k, out, begin, end);
    case Q4_1: return dequant_rows<Q4_1>(w, row_bytes, k, out, begin, end);
    case Q4_K: return dequant_rows<Q4_K>(w, row_bytes, k, out, begin, end);
    case Q5_K: return dequant_rows<Q5_K>(w, row_bytes, k, out, begin, end);
    case Q6_K: return dequant_rows<Q6_K>(w, row_bytes, k, out, begin, end);
    case INT4_G64: return dequant_rows<INT4_G64>(w, row_bytes, k, out, begin, end);
    case INT4_G128: return dequant_rows<INT4_G128>(w, row_bytes, k, out, begin, end);
  }
}

// The weight an op's format code names (format | kRowsInterleaved?), checked against `packed`.
Packed check_packed(const at::Tensor& packed, int64_t code, int64_t k) {
  const bool interleaved = code & kRowsInterleaved;
  const int64_t format = code & ~kRowsInterleaved;
  TORCH_CHECK(packed.dtype() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "quant kernels: packed weights must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(format >= Q8_0 && format <= INT4_G128, "quant kernels: unknown format code ", code);
  TORCH_CHECK(!interleaved || kernel_format(format) <= Q4_1,
              "quant kernels: format code ", format, " has no interleaved layout");
  TORCH_CHECK(k % block_size(format) == 0 && packed.size(1) == k / block_size(format) * block_bytes(format),
              "quant kernels: packed row of ", packed.size(1), " bytes does not hold ", k, " features");
  return {kernel_format(format), interleaved};
}

// t as an fp32 contiguous tensor: t itself when it is one already (a decode step's input and bias, ~200
// calls a step, skip the dispatcher calls of .to() / .contiguous(), a microsecond each), else a copy.
inline at::Tensor fp32_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& packed, const c10::optional<at::Tensor>& bias_in,
                        int64_t code, int64_t k) {
  const Packed p = check_packed(packed, code, k);
  const int64_t format = p.format;
  TORCH_CHECK(x_in.size(-1) == k, "quant_linear: input has ", x_in.size(-1), " features, weight ", k);
  const bool fp32 = x_in.scalar_type() == at::kFloat;
  at::Tensor x = fp32_contiguous(x_in);
  const int64_t n = packed.size(0);
  const int64_t rows = k ? x.numel() / k : 0;
  c10::SmallVector<int64_t, 4> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = fp32_contiguous(*bias_in);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int64_t row_bytes = packed.size(1);
  if (rows <= kDecodeRows) {
    at::Tensor y = at::empty(shape, x.options());
    const float* xp = x.data_ptr<float>();
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    if (p.interleaved) {
      // each activation row's block sums, then a group of output rows a unit (and the rows after the last group)
      const int64_t nb = k / kBlock, group = group_rows(format), groups = n / group;
      // per thread, kept between calls: a decode step makes ~200 of them
      thread_local std::vector<float> sums, repeated;
      if (format != Q8_0) {  // Q8_0 has no m
        sums.resize(std::max<size_t>(sums.size(), rows * nb));
        for (int64_t i = 0; i < rows * nb; i++) sums[i] = block_sum(xp + i * kBlock);
      }
      const float* xs = sums.data();
      const float* x8 = nullptr;
#if defined(__AVX512F__)
      if (rows <= 2 && rows * k <= kRepeatedInputs) {
        repeated.resize(std::max<size_t>(repeated.size(), rows * k * kLanes));
        float* copies = repeated.data();
        for (int64_t i = 0; i < rows * k; i++) _mm256_storeu_ps(copies + i * kLanes, _mm256_set1_ps(xp[i]));
        x8 = copies;
      }
#endif
      at::parallel_for(0, groups + (n % group ? 1 : 0), 8, [&](int64_t begin, int64_t end) {
        switch (format) {
          case Q8_0: return decode_interleaved<Q8_0>(w, row_bytes, xp, xs, x8, rows, k, bp, yp, n, begin, end);
          case Q4_0: return decode_interleaved<Q4_0>(w, row_bytes, xp, xs, x8, rows, k, bp, yp, n, begin, end);
          case Q4_1: return decode_interleaved<Q4_1>(w, row_bytes, xp, xs, x8, rows, k, bp, yp, n, begin, end);
        }
      });
      return fp32 ? y : y.to(x_in.scalar_type());
    }
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      switch (format) {
        case Q8_0: return decode_rows<Q8_0>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
        case Q4_0: return decode_rows<Q4_0>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
        case Q4_1: return decode_rows<Q4_1>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
        case Q4_K: return decode_rows<Q4_K>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
        case Q5_K: return decode_rows<Q5_K>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
        case Q6_K: return decode_rows<Q6_K>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
        case INT4_G64: return decode_rows<INT4_G64>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
        case INT4_G128: return decode_rows<INT4_G128>(w, row_bytes, xp, rows, k, bp, yp, n, begin, end);
      }
    });
    return fp32 ? y : y.to(x_in.scalar_type());
  }
  at::Tensor x2 = x.view({rows, k});
  at::Tensor y = at::empty({rows, n}, x.options());
  constexpr int64_t kChunk = 1024;
  at::Tensor tile = at::empty({std::min(kChunk, n), k}, x.options());
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    float* tp = tile.data_ptr<float>();
    at::parallel_for(start, start + len, 16, [&](int64_t begin, int64_t end) {
      dequant_dispatch(p, w, row_bytes, n, k, tp + (begin - start) * k, begin, end);
    });
    y.narrow(1, start, len).copy_(at::mm(x2, tile.narrow(0, 0, len).t()));
  }
  if (bias.defined()) y.add_(bias);
  return y.view(shape).to(x_in.scalar_type());
}

at::Tensor quant_dequantize(const at::Tensor& packed, int64_t code, int64_t k) {
  const Packed p = check_packed(packed, code, k);
  const int64_t n = packed.size(0);
  at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kFloat));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    dequant_dispatch(p, w, packed.size(1), n, k, op + begin * k, begin, end);
  });
  return out;
}

at::Tensor quant_embedding(const at::Tensor& packed, const at::Tensor& ids_in, int64_t code, int64_t k) {
  const Packed p = check_packed(packed, code, k);
  at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t count = ids.numel();
  const int64_t vocab = packed.size(0);
  at::Tensor out = at::empty({count, k}, packed.options().dtype(at::kFloat));
  const int64_t* ip = ids.data_ptr<int64_t>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int64_t row_bytes = packed.size(1);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < count; i++) {
    const int64_t row = ip[i];
    TORCH_CHECK(row >= 0 && row < vocab, "quant_embedding: index ", row, " out of range for ", vocab, " rows");
    dequant_dispatch(p, w, row_bytes, vocab, k, op + i * k, row, row + 1);
  }
  std::vector<int64_t> shape(ids_in.sizes().begin(), ids_in.sizes().end());
  shape.push_back(k);
  return out.view(shape);
}

}  // namespace

// A native program calls the ops through these C functions (declared in quant.C_SHIMS), not its boxing
// proxy executor: see aoti_shim.h.
using tpcompile_shim::handle_of;
using tpcompile_shim::optional_tensor;
using tpcompile_shim::tensor_of;
using tpcompile_shim::typed_op;

extern "C" {

AOTITorchError aoti_torch_cpu_quant_linear(AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle* bias,
                                           int64_t format, int64_t in_features, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                               int64_t, int64_t)>("tpcompile::quant_linear");
    *ret0 = handle_of(op.call(tensor_of(x), tensor_of(packed), optional_tensor(bias), format, in_features));
  });
}

AOTITorchError aoti_torch_cpu_quant_embedding(AtenTensorHandle packed, AtenTensorHandle ids, int64_t format,
                                              int64_t in_features, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>("tpcompile::quant_embedding");
    *ret0 = handle_of(op.call(tensor_of(packed), tensor_of(ids), format, in_features));
  });
}

}  // extern "C"

TORCH_LIBRARY_IMPL(tpcompile, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_embedding", &quant_embedding);
  m.impl("quant_dequantize", &quant_dequantize);
}
