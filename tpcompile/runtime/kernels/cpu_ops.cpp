// CPU kernels of tpcompile's custom ops, so that compiled code (an AOTInductor package, an Inductor graph)
// calls them without a Python call: the decode matrix-vector product, the same-host shared-memory
// collectives and attention over the written part of the KV cache (a decode step's few queries by a direct
// loop, longer prompts by SDPA).
//
// Built by cpu_ops.py with the host's C++ compiler against the running torch, cached per source, CPU and
// torch version. The ops' schemas (and fake kernels) are defined in Python; this file only implements
// them for the CPU. Invariants:
// - streaming_linear: every output element is one dot product of a weight row with an activation row,
//   accumulated in float32 in a fixed order (bit-identical on every call and every rank);
// - the collectives speak exactly the protocol of transport/shm.py (sequence numbers in the header,
//   two slots per rank used in turn, sums in rank order with the same ATen additions as
//   transport/rank_sum.py: float32 for bf16/fp16 payloads, rounded once), so Python and C++ calls can
//   alternate on one communicator; a half payload on the process group is all-gathered and summed so;
// - a rank waiting for peers throws (message starting "tpcompile collective:") once a peer's process is
//   gone or the timeout passed, never waits forever.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <signal.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "aoti_shim.h"
#include "vector_math.h"

namespace {

// ---------------------------------------------------------------------------------------------- linear
// kernel_tail_fma: a scalar sum after the vector loop (s += w[k] * x[k]) is written as std::fma. Left to
// the compiler, an AVX-512 build turned it into vector products added one by one (two roundings each),
// an AVX2 build into FMAs (one): different bits on two hosts, against vector_math.h's invariant.
using tpcompile_simd::hsum;
using tpcompile_simd::load16;
using tpcompile_simd::v16f;

// One weight row times one activation row, the decode product's unit: two 16-lane accumulators over
// alternate 16-float chunks, then hsum, then the tail in order; one order on every host. Each weight row is
// one sequential stream, which the hardware prefetchers follow best. On x86 the lanes are 32-byte vectors,
// AVX-512 or not (the same lanes, so the same sums). On one thread of an AMD EPYC (bench/gemv.py: a decode
// step's products) this reads 33-35 GB/s where a plain sum reads 35-36, in AVX2 and AVX-512 builds alike;
// 4 rows side by side read 23-24 in an AVX2 build, 8 rows (AVX-512) 30, 64-byte loads of rows that are not
// 64-byte aligned 26.
#if defined(__AVX__)
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float dot1(const float* w, long k_total, const float* x) {
  v8f a0{}, a1{}, b0{}, b1{};  // a: lanes 0-7 and 8-15 of the even chunks; b: of the odd ones
  long k = 0;
  for (; k + 32 <= k_total; k += 32) {
    a0 += load8(w + k) * load8(x + k);
    a1 += load8(w + k + 8) * load8(x + k + 8);
    b0 += load8(w + k + 16) * load8(x + k + 16);
    b1 += load8(w + k + 24) * load8(x + k + 24);
  }
  if (k + 16 <= k_total) {
    a0 += load8(w + k) * load8(x + k);
    a1 += load8(w + k + 8) * load8(x + k + 8);
    k += 16;
  }
  float s = tpcompile_simd::hsum8((a0 + b0) + (a1 + b1));  // hsum(a + b)
  for (; k < k_total; k++) s = std::fma(w[k], x[k], s);  // see kernel_tail_fma
  return s;
}
#else
inline float dot1(const float* w, long k_total, const float* x) {
  v16f a{}, b{};
  long k = 0;
  for (; k + 32 <= k_total; k += 32) {
    a += load16(w + k) * load16(x + k);
    b += load16(w + k + 16) * load16(x + k + 16);
  }
  if (k + 16 <= k_total) {
    a += load16(w + k) * load16(x + k);
    k += 16;
  }
  float s = hsum(a + b);
  for (; k < k_total; k++) s = std::fma(w[k], x[k], s);  // see kernel_tail_fma
  return s;
}
#endif

constexpr long kMaxRows = 8;

bool streamable(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  if (x.device().type() != at::kCPU || w.device().type() != at::kCPU) return false;
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat) return false;
  if (w.dim() != 2 || !w.is_contiguous() || x.dim() < 1 || x.size(-1) != w.size(1) || w.size(1) == 0)
    return false;
  if (x.numel() / std::max<int64_t>(1, w.size(1)) > kMaxRows) return false;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    if (b.device().type() != at::kCPU || b.scalar_type() != at::kFloat || b.dim() != 1 ||
        b.size(0) != w.size(0) || !b.is_contiguous())
      return false;
  }
  return true;
}

at::Tensor streaming_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (!streamable(x, weight, bias)) return at::linear(x, weight, bias);
  const long n_out = weight.size(0), k_total = weight.size(1);
  const long rows = k_total ? x.numel() / k_total : 0;
  at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  at::Tensor out = at::empty(shape, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const float* b = (bias.has_value() && bias->defined()) ? bias->data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  // a grain of 256 output rows (>= 150 KB of weights): small products stay on one thread. Output row o
  // of every activation row is computed while weight row o is in L1.
  at::parallel_for(0, n_out, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t o = lo; o < hi; o++)
      for (long m = 0; m < rows; m++) {
        const float s = dot1(w + o * k_total, k_total, xp + m * k_total);
        y[m * n_out + o] = b ? s + b[o] : s;
      }
  });
  return out;
}

// ------------------------------------------------------------------------------------- shared memory
struct Communicator {
  char* base = nullptr;  // the mapped segment (owned by Python's ShmCommunicator)
  int64_t rank = 0, world = 0, header = 64, slot_bytes = 0;
  double timeout_s = 300.0;
  std::string group;  // the process group for what does not fit a slot ("" : none)
  bool attached = false;
  double seconds = 0.0;  // time in shared-memory collectives (waits included), for tprun --profile
  int64_t calls = 0;
};

Communicator comm;

inline std::atomic<int64_t>* seq_of(int64_t rank) {
  return reinterpret_cast<std::atomic<int64_t>*>(comm.base + rank * comm.header);
}

inline int64_t pid_of(int64_t rank) {
  return reinterpret_cast<std::atomic<int64_t>*>(comm.base + rank * comm.header + 8)->load();
}

inline char* slot(int64_t rank, int64_t parity) {
  return comm.base + comm.world * comm.header + (rank * 2 + parity) * comm.slot_bytes;
}

bool alive(int64_t pid) {
  if (pid <= 0) return true;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return errno != ENOENT;
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close = std::strrchr(buf, ')');
  return !(close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X'));
}

void wait_all(int64_t seq) {
  using clock = std::chrono::steady_clock;
  auto started = clock::now(), checked = started;
  for (;;) {
    int64_t waiting = -1;
    for (int64_t r = 0; r < comm.world; r++) {
      if (r != comm.rank && seq_of(r)->load(std::memory_order_acquire) < seq) {
        waiting = r;
        break;
      }
    }
    if (waiting < 0) return;
    auto now = clock::now();
    double spent = std::chrono::duration<double>(now - started).count();
    if (std::chrono::duration<double>(now - checked).count() > 0.25) {
      checked = now;
      int64_t pid = pid_of(waiting);
      if (!alive(pid)) {
        std::ostringstream msg;
        msg << "tpcompile collective: rank " << waiting << " (pid " << pid << ") exited during a collective";
        throw std::runtime_error(msg.str());
      }
      if (spent > comm.timeout_s) {
        std::ostringstream msg;
        msg << "tpcompile collective: collective timed out after " << comm.timeout_s << " s waiting for rank "
            << waiting << " (raise --timeout if a rank is legitimately this slow)";
        throw std::runtime_error(msg.str());
      }
    }
    if (spent > 0.05) {
      struct timespec pause = {0, 200000};
      nanosleep(&pause, nullptr);
    } else {
      sched_yield();
    }
  }
}

// Publish t in this rank's slot; return (parity, bytes) once every rank has published it.
std::pair<int64_t, int64_t> exchange(const at::Tensor& t) {
  const auto started = std::chrono::steady_clock::now();
  struct Clock {  // counts the call however it ends
    std::chrono::steady_clock::time_point started;
    ~Clock() {
      comm.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      comm.calls += 1;
    }
  } clock{started};
  const int64_t seq = seq_of(comm.rank)->load(std::memory_order_relaxed) + 1;
  const int64_t parity = seq % 2;
  wait_all(seq - 1);  // peers are done reading the slot this call overwrites
  at::Tensor src = t.contiguous();
  const int64_t nbytes = src.numel() * src.element_size();
  std::memcpy(slot(comm.rank, parity), src.data_ptr(), nbytes);
  seq_of(comm.rank)->store(seq, std::memory_order_release);
  wait_all(seq);
  return {parity, nbytes};
}

at::Tensor peer(int64_t rank, int64_t parity, const at::Tensor& like) {
  return at::from_blob(slot(rank, parity), like.sizes(), like.options().device(at::kCPU));
}

bool fits(const at::Tensor& t) {
  return comm.attached && t.device().type() == at::kCPU && t.numel() * t.element_size() <= comm.slot_bytes;
}

// The functional collectives, called boxed: their group argument is typed Any (an IValue).
at::Tensor call_collective(const char* name, std::vector<c10::IValue> args) {
  const auto& op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  const auto& wait = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  torch::jit::Stack stack(args.begin(), args.end());
  op.callBoxed(&stack);
  torch::jit::Stack waited{stack.back()};
  wait.callBoxed(&waited);
  return waited.back().toTensor().contiguous();
}

at::Tensor group_all_gather(const at::Tensor& t, int64_t world) {
  return call_collective("_c10d_functional::all_gather_into_tensor", {t.contiguous(), world, comm.group});
}

bool half(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

// parts[0] + parts[1] + ... in rank order (rank_sum.rank_order_sum): float32 additions for half payloads.
at::Tensor rank_order_sum(const std::vector<at::Tensor>& parts) {
  if (parts.size() == 1) return parts[0].clone();
  if (!half(parts[0])) {
    at::Tensor acc = at::add(parts[0], parts[1]);
    for (size_t r = 2; r < parts.size(); r++) acc.add_(parts[r]);
    return acc;
  }
  at::Tensor acc = parts[0].to(at::kFloat);
  for (size_t r = 1; r < parts.size(); r++) acc.add_(parts[r]);
  return acc.to(parts[0].scalar_type());
}

at::Tensor group_all_reduce(const at::Tensor& t) {
  if (!half(t)) return call_collective("_c10d_functional::all_reduce", {t, std::string("sum"), comm.group});
  at::Tensor gathered = group_all_gather(t.contiguous().reshape({1, -1}), comm.world);
  std::vector<at::Tensor> parts;
  for (int64_t r = 0; r < comm.world; r++) parts.push_back(gathered[r]);
  return rank_order_sum(parts).reshape(t.sizes());
}

at::Tensor all_reduce_sum(const at::Tensor& t) {
  if (!fits(t)) {
    TORCH_CHECK(!comm.group.empty(), "tpcompile collective: no transport bound (bind_transport first)");
    return group_all_reduce(t);
  }
  auto [parity, nbytes] = exchange(t);
  (void)nbytes;
  at::Tensor like = t.contiguous();
  if (like.scalar_type() == at::kFloat) {
    // the slots summed in rank order by a plain loop: the same fp32 additions as rank_order_sum, without
    // its TensorIterator set-up (~1 us, twice per layer of a decode step)
    at::Tensor out = at::empty(like.sizes(), like.options());
    float* o = out.data_ptr<float>();
    const int64_t count = like.numel();
    std::memcpy(o, slot(0, parity), count * sizeof(float));
    for (int64_t r = 1; r < comm.world; r++) {
      const float* p = reinterpret_cast<const float*>(slot(r, parity));
      for (int64_t i = 0; i < count; i++) o[i] += p[i];
    }
    return out;
  }
  std::vector<at::Tensor> parts;
  for (int64_t r = 0; r < comm.world; r++) parts.push_back(peer(r, parity, like));
  return rank_order_sum(parts);
}

at::Tensor all_gather(const at::Tensor& t, int64_t world) {
  if (!fits(t)) {
    TORCH_CHECK(!comm.group.empty(), "tpcompile collective: no transport bound (bind_transport first)");
    return group_all_gather(t, world);
  }
  auto [parity, nbytes] = exchange(t);
  (void)nbytes;
  at::Tensor like = t.contiguous();
  std::vector<at::Tensor> parts;
  for (int64_t r = 0; r < comm.world; r++) parts.push_back(peer(r, parity, like));
  return at::cat(parts, 0);
}

// The first index of the maximum of p[0, n), n >= 1, by torch.argmax's rules: a NaN counts as the maximum
// and the first NaN wins; among equal maxima the first wins. Two passes: the maximum (8 independent lanes,
// NaNs noted aside), then its first index.
int64_t first_argmax(const float* p, int64_t n) {
  float lanes[8];
  std::fill(lanes, lanes + 8, -std::numeric_limits<float>::infinity());
  bool nan = false;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; l++) {
      const float v = p[j + l];
      lanes[l] = v > lanes[l] ? v : lanes[l];
      nan |= v != v;
    }
  for (; j < n; j++) {
    lanes[0] = p[j] > lanes[0] ? p[j] : lanes[0];
    nan |= p[j] != p[j];
  }
  if (nan)
    for (j = 0; j < n; j++)
      if (p[j] != p[j]) return j;
  const float top = *std::max_element(lanes, lanes + 8);
  for (j = 0; j < n; j++)
    if (p[j] == top) return j;
  return 0;  // unreachable: top is one of p's values
}

// Per row of logits [B, V] (fp32, contiguous): (its maximum, the global id offset + its first index) over
// the first `valid` columns as two doubles (exact for any logit and any id < 2^53); (-inf, offset) when
// valid == 0 (a rank holding only padding).
void local_maxima(const at::Tensor& logits, int64_t valid, int64_t offset, double* pairs) {
  for (int64_t b = 0; b < logits.size(0); b++) {
    const float* p = logits.data_ptr<float>() + b * logits.size(1);
    const int64_t j = valid > 0 ? first_argmax(p, valid) : 0;
    pairs[2 * b] = valid > 0 ? double(p[j]) : -std::numeric_limits<double>::infinity();
    pairs[2 * b + 1] = double(j + offset);
  }
}

// The id of the first rank's pair holding the largest value (a NaN counting as the largest) for row b of
// the pairs every rank published in the slots of `parity`: torch.argmax's rule over the concatenation.
int64_t first_maximal_rank_id(int64_t parity, int64_t b) {
  const double* first = reinterpret_cast<const double*>(slot(0, parity)) + 2 * b;
  double top = first[0], id = first[1];
  for (int64_t r = 1; r < comm.world && top == top; r++) {
    const double* theirs = reinterpret_cast<const double*>(slot(r, parity)) + 2 * b;
    if (theirs[0] > top || theirs[0] != theirs[0]) {
      top = theirs[0];
      id = theirs[1];
    }
  }
  return static_cast<int64_t>(id);
}

// The global greedy token of each row of vocabulary-sharded logits local [B, V_local] (fp32, bf16 or fp16),
// whose first `valid` columns are the vocabulary ids [offset, offset + valid): each rank publishes its
// local_maxima through the shared-memory slots and every rank takes first_maximal_rank_id per row, i.e.
// torch.argmax over the concatenated vocabulary (lowest id on ties), on every rank alike.
// lm/sampling.distributed_argmax in one call, without the Python ops between a step's last kernel and the
// next step (~0.4 ms of a ~4.4 ms quantized SmolLM2 tp=2 step).
at::Tensor sharded_argmax(const at::Tensor& local, int64_t valid, int64_t offset) {
  TORCH_CHECK(comm.attached, "tpcompile collective: sharded_argmax needs the shared-memory transport");
  TORCH_CHECK(local.dim() == 2 && local.device().type() == at::kCPU,
              "tpcompile collective: sharded_argmax expects [B, V] CPU logits");
  const at::Tensor logits = local.to(at::kFloat).contiguous();  // bf16 / fp16 widen exactly
  const int64_t rows = logits.size(0);
  at::Tensor pairs = at::empty({rows, 2}, logits.options().dtype(at::kDouble));
  TORCH_CHECK(fits(pairs), "tpcompile collective: ", rows, " rows of pairs do not fit a shared-memory slot");
  local_maxima(logits, std::min(valid, logits.size(1)), offset, pairs.data_ptr<double>());
  const int64_t parity = exchange(pairs).first;
  at::Tensor ids = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* out = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; b++) out[b] = first_maximal_rank_id(parity, b);
  return ids;
}

void attach(int64_t address, int64_t rank, int64_t world, int64_t header, int64_t slot_bytes, double timeout_s,
            std::string group) {
  comm.base = reinterpret_cast<char*>(address);
  comm.rank = rank;
  comm.world = world;
  comm.header = header;
  comm.slot_bytes = slot_bytes;
  comm.timeout_s = timeout_s;
  comm.group = std::move(group);
  comm.attached = address != 0;
}

// ---------------------------------------------------------------------------------------- attention
// The columns of a boolean (false) or additive (-inf / lowest float) mask that no query may attend; a mask of
// another dtype closes none. The pointer is read once: a decode step's mask is scanned from its last column
// down to the written ones (~450 columns of a 512-position cache), 30 to 60 times a step.
template <typename T, typename Closed>
int64_t last_open_column(const at::Tensor& m, int64_t keys, Closed closed) {
  const T* p = m.data_ptr<T>();
  const int64_t rows = m.numel() / keys;
  for (int64_t col = keys - 1; col >= 0; col--)
    for (int64_t row = 0; row < rows; row++)
      if (!closed(p[row * keys + col])) return col + 1;
  return keys;
}

// 1 + the last column of a boolean mask that some row opens (0: none), each row scanned from its end 8
// columns at a time: a decode step's mask at --max-seq-len 4096 is mostly closed columns, 60 masks a step.
int64_t last_open_bool_column(const at::Tensor& m, int64_t keys) {
  const bool* p = m.data_ptr<bool>();
  int64_t last = 0;
  for (int64_t row = 0; row < m.numel() / keys && last < keys; row++) {
    const bool* r = p + row * keys;
    int64_t end = keys;
    for (uint64_t word = 0; end - 8 >= last; end -= 8) {
      std::memcpy(&word, r + end - 8, 8);
      if (word != 0) break;
    }
    while (end > last && !r[end - 1]) end--;
    last = std::max(last, end);
  }
  return last;
}

int64_t attended_prefix(const at::Tensor& mask) {
  const int64_t keys = mask.size(-1);
  at::Tensor m = mask.contiguous();
  if (keys == 0 || m.numel() == 0) return keys;
  if (m.scalar_type() == at::kBool) {
    const int64_t last = last_open_bool_column(m, keys);
    return last == 0 ? keys : last;  // no open column: every column kept, as last_open_column does
  }
  if (m.scalar_type() == at::kFloat)
    return last_open_column<float>(m, keys, [](float v) {
      return v == -std::numeric_limits<float>::infinity() || v == std::numeric_limits<float>::lowest();
    });
  return keys;  // other dtypes: keep every column
}

// One head's keys and values of one batch row: key j at keys + j * key_stride (dim floats), value j at
// values + j * value_stride (value_dim floats).
struct AttendedKeys {
  const float* keys;
  int64_t key_stride;
  const float* values;
  int64_t value_stride;
  int64_t count, dim, value_dim;
};

// One query row's mask over the keys: boolean (false: closed) or additive fp32, column j at j * stride;
// neither pointer set: no mask.
struct KeyMask {
  const bool* open = nullptr;
  const float* add = nullptr;
  int64_t stride = 0;
};

// One query row of an attention call: its query, its mask over the keys, where its output goes, and
// whether any key was open for it (when none is, out is left untouched).
struct QueryRow {
  const float* q;
  KeyMask mask;
  float* out;
  bool open;
};

// softmax(q . k_j * scale + mask_j) . v for one query row, any dims: one key at a time, the weighted sum of
// values in acc. p holds the count scores. Each score is hsum(q * k_j) * scale (+ mask), as in attend_rows.
bool attend_row(const float* q, const AttendedKeys& kv, const KeyMask& mask, float scale, float* p, float* acc,
                float* out) {
  constexpr float kClosed = -std::numeric_limits<float>::infinity();
  float top = kClosed;
  for (int64_t j = 0; j < kv.count; j++) {
    if (mask.open != nullptr && !mask.open[j * mask.stride]) {
      p[j] = kClosed;
      continue;
    }
    const float* kj = kv.keys + j * kv.key_stride;
    int64_t d = 0;
    v16f a{};
    for (; d + 16 <= kv.dim; d += 16) a += load16(q + d) * load16(kj + d);
    float s = hsum(a);
    for (; d < kv.dim; d++) s = std::fma(q[d], kj[d], s);  // see kernel_tail_fma
    s = s * scale;
    if (mask.add != nullptr) s += mask.add[j * mask.stride];
    p[j] = s;
    top = std::max(top, s);
  }
  if (top == kClosed) return false;
  float sum = 0.0f;
  for (int64_t j = 0; j < kv.count; j++) {
    p[j] = std::exp(p[j] - top);
    sum += p[j];
  }
  const float inv = 1.0f / sum;
  std::fill(acc, acc + kv.value_dim, 0.0f);
  for (int64_t j = 0; j < kv.count; j++) {
    if (p[j] == 0.0f) continue;
    const float* vj = kv.values + j * kv.value_stride;
    const float w = p[j];
    int64_t d = 0;
    for (; d + 16 <= kv.value_dim; d += 16) tpcompile_simd::store16(acc + d, load16(acc + d) + w * load16(vj + d));
    for (; d < kv.value_dim; d++) acc[d] += w * vj[d];
  }
  for (int64_t d = 0; d < kv.value_dim; d++) out[d] = acc[d] * inv;
  return true;
}

// Head dims up to 16 * kMaxHeadVectors take attend_rows<V> (dim == value_dim == 16 V).
constexpr int64_t kMaxHeadVectors = 8;
constexpr int64_t kKeyTile = 16;

// attend_row for every row of `rows` over the same keys (the query heads of one GQA group, each with its
// queries), the keys taken 16 at a time: each tile of keys and values is read from memory once for all the
// rows (a long cache does not fit in L2), the 16 scores of a row are reduced together (hsum16) and
// exponentiated together (exp16). p: rows x pitch scores (pitch: count rounded up to a multiple of 16).
// Per row, each score is the same fp32 number as attend_row's and the weighted values add in key order;
// only exp and the order of the softmax's sum differ.
template <int V>
void attend_rows(QueryRow* rows, int64_t n_rows, const AttendedKeys& kv, float scale, float* p, int64_t pitch) {
  constexpr float kClosed = -std::numeric_limits<float>::infinity();
  std::vector<v16f> tops(n_rows, tpcompile_simd::splat16(kClosed));
  std::vector<float> inverse_sums(n_rows);
  for (int64_t t = 0; t < kv.count; t += kKeyTile) {
    const int64_t n = std::min(kKeyTile, kv.count - t);
    for (int64_t r = 0; r < n_rows; r++) {
      v16f qv[V];
      for (int c = 0; c < V; c++) qv[c] = load16(rows[r].q + 16 * c);
      v16f dots[kKeyTile];
      for (int64_t j = 0; j < n; j++) {
        const float* kj = kv.keys + (t + j) * kv.key_stride;
        v16f a = qv[0] * load16(kj);
        for (int c = 1; c < V; c++) a += qv[c] * load16(kj + 16 * c);
        dots[j] = a;
      }
      for (int64_t j = n; j < kKeyTile; j++) dots[j] = v16f{};  // past the last key: lanes set closed below
      float* pr = p + r * pitch + t;
      tpcompile_simd::store16(pr, scale * tpcompile_simd::hsum16(dots));
      const KeyMask& mask = rows[r].mask;
      for (int64_t j = 0; j < kKeyTile; j++) {
        const int64_t key = t + j;
        if (j >= n || (mask.open != nullptr && !mask.open[key * mask.stride]))
          pr[j] = kClosed;
        else if (mask.add != nullptr)
          pr[j] += mask.add[key * mask.stride];
      }
      tops[r] = tpcompile_simd::max16(tops[r], load16(pr));
    }
  }
  for (int64_t r = 0; r < n_rows; r++) {
    float top = kClosed;
    for (int i = 0; i < 16; i++) top = std::max(top, tops[r][i]);
    rows[r].open = top != kClosed;
    if (!rows[r].open) continue;
    v16f sums{};
    for (int64_t t = 0; t < kv.count; t += kKeyTile) {
      float* pr = p + r * pitch + t;
      const v16f e = tpcompile_simd::exp16(load16(pr) - top);
      tpcompile_simd::store16(pr, e);
      sums += e;
    }
    inverse_sums[r] = 1.0f / hsum(sums);
    for (int c = 0; c < V; c++) tpcompile_simd::store16(rows[r].out + 16 * c, v16f{});
  }
  for (int64_t t = 0; t < kv.count; t += kKeyTile) {
    const int64_t n = std::min(kKeyTile, kv.count - t);
    for (int64_t r = 0; r < n_rows; r++) {
      if (!rows[r].open) continue;
      const float* pr = p + r * pitch + t;
      v16f o[V];
      for (int c = 0; c < V; c++) o[c] = load16(rows[r].out + 16 * c);
      for (int64_t j = 0; j < n; j++) {
        if (pr[j] == 0.0f) continue;  // a closed key: its cache slot may hold anything
        const float* vj = kv.values + (t + j) * kv.value_stride;
        for (int c = 0; c < V; c++) o[c] += pr[j] * load16(vj + 16 * c);
      }
      for (int c = 0; c < V; c++) tpcompile_simd::store16(rows[r].out + 16 * c, o[c]);
    }
  }
  for (int64_t r = 0; r < n_rows; r++)
    if (rows[r].open)
      for (int c = 0; c < V; c++)
        tpcompile_simd::store16(rows[r].out + 16 * c, inverse_sums[r] * load16(rows[r].out + 16 * c));
}

// The few query rows of a decode step: a direct loop per (batch, KV head) instead of the flash kernel,
// whose fixed cost per call (~15 us: buffers, thread dispatch, blocking for long sequences) is most of a
// decode step's attention over a short cache. softmax(q . k * scale + mask) . v in fp32: scores, their
// maximum, exp(score - max), their sum, then the weighted values divided by the sum (the flash kernel's
// result up to the order of fp32 sums). Handles fp32 4-D query/key/value with contiguous rows (a view of
// the cache is fine), GQA (query head h reads key head h / (Hq / Hkv)) and a boolean or fp32 additive mask
// broadcastable to [B, Hq, Lq, keys]; false for anything else (the caller then runs SDPA). Only the first S
// keys are read (of k, v and the mask's last dim; the caller knows the rest closed), so no narrowed views.
constexpr int64_t kSmallQueries = 8;

bool few_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask_in, int64_t S, c10::optional<double> scale_in,
                         bool enable_gqa, at::Tensor& out) {
  if (q.scalar_type() != at::kFloat || k.scalar_type() != at::kFloat || v.scalar_type() != at::kFloat) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || q.device().type() != at::kCPU) return false;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Dv = v.size(3);
  if (L > kSmallQueries || S < 1 || S > k.size(2) || k.size(0) != B || v.size(0) != B || v.size(1) != Hkv ||
      v.size(2) != k.size(2) || k.size(3) != D || Hkv < 1 || H % Hkv != 0 || (H != Hkv && !enable_gqa))
    return false;
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) return false;
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) {
    const at::ScalarType t = mask_in->scalar_type();
    if ((t != at::kBool && t != at::kFloat) || mask_in->dim() > 4 || mask_in->device().type() != at::kCPU)
      return false;
    mask = mask_in->expand({B, H, L, k.size(2)});  // strides of 0 where it broadcasts
  }
  const float scale = scale_in.has_value() ? float(*scale_in) : float(1.0 / std::sqrt(double(D)));
  out = at::empty({B, H, L, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool bool_mask = mask.defined() && mask.scalar_type() == at::kBool;
  const bool* mb = bool_mask ? mask.data_ptr<bool>() : nullptr;
  const float* mf = mask.defined() && !bool_mask ? mask.data_ptr<float>() : nullptr;
  const int64_t group = H / Hkv;
  std::atomic<bool> fully_masked{false};
  // enough work per task that waking a thread pays (a short cache runs inline)
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L * S * (D + Dv)));
  const int64_t vectors = D == Dv && D % 16 == 0 && D <= 16 * kMaxHeadVectors ? D / 16 : 0;
  const int64_t pitch = (S + kKeyTile - 1) / kKeyTile * kKeyTile;
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(vectors ? std::min(end - begin, group) * L * pitch : S);
    std::vector<float> acc(Dv);
    std::vector<QueryRow> rows;
    for (int64_t bh = begin; bh < end;) {
      // the heads of this task that read the same key head (all of a GQA group when the task holds it)
      const int64_t b = bh / H, g = (bh % H) / group;
      const int64_t run_end = std::min(end, b * H + (g + 1) * group);
      AttendedKeys keys{kp + b * k.stride(0) + g * k.stride(1), k.stride(2), vp + b * v.stride(0) + g * v.stride(1),
                        v.stride(2), S, D, Dv};
      rows.clear();
      for (; bh < run_end; bh++)
        for (int64_t i = 0; i < L; i++) {
          const int64_t h = bh % H;
          KeyMask m;
          if (mask.defined()) {
            const int64_t row = b * mask.stride(0) + h * mask.stride(1) + i * mask.stride(2);
            m = KeyMask{mb ? mb + row : nullptr, mf ? mf + row : nullptr, mask.stride(3)};
          }
          rows.push_back(QueryRow{qp + b * q.stride(0) + h * q.stride(1) + i * q.stride(2), m,
                                  op + ((b * H + h) * L + i) * Dv, false});
        }
      const int64_t n = int64_t(rows.size());
      switch (vectors) {
        case 1: attend_rows<1>(rows.data(), n, keys, scale, p.data(), pitch); break;
        case 2: attend_rows<2>(rows.data(), n, keys, scale, p.data(), pitch); break;
        case 3: attend_rows<3>(rows.data(), n, keys, scale, p.data(), pitch); break;
        case 4: attend_rows<4>(rows.data(), n, keys, scale, p.data(), pitch); break;
        case 5: attend_rows<5>(rows.data(), n, keys, scale, p.data(), pitch); break;
        case 6: attend_rows<6>(rows.data(), n, keys, scale, p.data(), pitch); break;
        case 7: attend_rows<7>(rows.data(), n, keys, scale, p.data(), pitch); break;
        case 8: attend_rows<8>(rows.data(), n, keys, scale, p.data(), pitch); break;
        default:
          for (QueryRow& row : rows) row.open = attend_row(row.q, keys, row.mask, scale, p.data(), acc.data(), row.out);
      }
      for (const QueryRow& row : rows)
        if (!row.open) fully_masked = true;  // SDPA's own answer for a row with no open key
    }
  });
  return !fully_masked;
}

at::Tensor prefix_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                            c10::optional<double> scale, bool enable_gqa) {
  c10::optional<at::Tensor> mask = attn_mask;
  const int64_t keys = key.size(-2);
  const bool cut = mask.has_value() && mask->defined() && !is_causal && mask->dim() >= 2 &&
                   mask->size(-1) == keys && keys > 1 && mask->device().type() == at::kCPU;
  const int64_t length = cut ? attended_prefix(*mask) : keys;
  at::Tensor out;
  if (dropout_p == 0.0 && !is_causal && few_query_attention(query, key, value, mask, length, scale, enable_gqa, out))
    return out;
  at::Tensor k = key, v = value;
  if (cut) {
    k = key.narrow(-2, 0, length);
    v = value.narrow(-2, 0, length);
    mask = mask->narrow(-1, 0, length);
  }
  if (cut && mask->scalar_type() == at::kBool)
    mask = at::zeros(mask->sizes(), query.options())
               .masked_fill_(mask->logical_not(), -std::numeric_limits<float>::infinity());
  return at::scaled_dot_product_attention(query, k, v, mask, dropout_p, is_causal, scale, enable_gqa).contiguous();
}

// A contiguous copy of the attention mask of a step (prefix_attention.py's computed_once): an opaque op,
// so that compiled code stores the mask once and every attention call of the step reads that copy.
at::Tensor computed_once(const at::Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); }

std::tuple<double, int64_t> collective_clock() { return {comm.seconds, comm.calls}; }

}  // namespace

TORCH_LIBRARY_IMPL(tpcompile, CPU, m) {
  m.impl("streaming_linear", &streaming_linear);
  m.impl("all_reduce_sum", &all_reduce_sum);
  m.impl("all_gather", &all_gather);
  m.impl("prefix_attention", &prefix_attention);
  m.impl("computed_once", &computed_once);
}

// ------------------------------------------------------------------------------- AOTInductor C shims
// A native program calls the ops through these C functions (declared in cpu_ops.C_SHIMS) instead of its
// proxy executor, which boxes every argument of every call (~8 us a call; a SmolLM2 decode step makes
// ~300). See aoti_shim.h.
using tpcompile_shim::handle_of;
using tpcompile_shim::optional_tensor;
using tpcompile_shim::tensor_of;
using tpcompile_shim::typed_op;

extern "C" {

AOTITorchError aoti_torch_cpu_streaming_linear(AtenTensorHandle x, AtenTensorHandle weight,
                                               AtenTensorHandle* bias, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const c10::optional<at::Tensor>&)>("tpcompile::streaming_linear");
    *ret0 = handle_of(op.call(tensor_of(x), tensor_of(weight), optional_tensor(bias)));
  });
}

AOTITorchError aoti_torch_cpu_all_reduce_sum(AtenTensorHandle t, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = typed_op<at::Tensor(const at::Tensor&)>("tpcompile::all_reduce_sum");
    *ret0 = handle_of(op.call(tensor_of(t)));
  });
}

AOTITorchError aoti_torch_cpu_all_gather(AtenTensorHandle t, int64_t world, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = typed_op<at::Tensor(const at::Tensor&, int64_t)>("tpcompile::all_gather");
    *ret0 = handle_of(op.call(tensor_of(t), world));
  });
}

AOTITorchError aoti_torch_cpu_prefix_attention(AtenTensorHandle query, AtenTensorHandle key,
                                               AtenTensorHandle value, AtenTensorHandle* attn_mask,
                                               double dropout_p, int32_t is_causal, double* scale,
                                               int32_t enable_gqa, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            double, bool, c10::optional<double>, bool)>("tpcompile::prefix_attention");
    const c10::optional<double> maybe_scale = scale ? c10::optional<double>(*scale) : c10::nullopt;
    *ret0 = handle_of(op.call(tensor_of(query), tensor_of(key), tensor_of(value),
                                            optional_tensor(attn_mask), dropout_p, is_causal != 0, maybe_scale,
                                            enable_gqa != 0));
  });
}

AOTITorchError aoti_torch_cpu_computed_once(AtenTensorHandle t, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = typed_op<at::Tensor(const at::Tensor&)>("tpcompile::computed_once");
    *ret0 = handle_of(op.call(tensor_of(t)));
  });
}

}  // extern "C"

TORCH_LIBRARY_FRAGMENT(tpcompile_cpu, m) {
  m.def("attach(int address, int rank, int world, int header, int slot_bytes, float timeout_s, str group) -> ()",
        &attach);
  m.def("clock() -> (float seconds, int calls)", &collective_clock);
  m.def("sharded_argmax(Tensor local, int valid, int offset) -> Tensor", &sharded_argmax);
}
