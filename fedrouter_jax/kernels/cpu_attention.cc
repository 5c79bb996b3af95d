// Fused float32 attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Why: on CPU, XLA runs attention as separate batched dots, a softmax over a materialised
// [B, K, G, T, S] tensor and layout transposes between them. At T = 128 these small dots are
// bound by memory writes, and attention took a share of the training step far above its share
// of the FLOPs (BENCHMARKS.md, attention). This kernel keeps each (batch, kv head) unit's tiles in cache, applies the additive
// bias and the softmax in registers, and skips key tiles that the bias masks for every query
// row of a micro block (the causal upper triangle, right padding).
//
// Semantics (same as fedrouter_jax.models.layers.xla_attention):
//   scores = (q . k) * scale + bias;  p = softmax(scores over keys);  o = p . v
// with q [N, T, H, D], k, v [N, S, K, D], bias [N, T, S] (N = product of leading dims; query
// head h reads kv head h / (H / K)). A key whose bias is below -1e30 contributes exactly 0
// (exp underflows), so skipping whole masked tiles is exact. A query row with no unmasked key
// keeps every key (uniform softmax, as the reference gives).
// The forward also returns the row max m and the row sum l [N, H, T] for the backward, which
// recomputes p = exp(s - m) / l instead of storing p.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;     // floats per vector register
constexpr int NV_MAX = 4;  // vectors per micro-kernel row: 4 rows x 4 = 16 accumulators of 32
#else
constexpr int VL = 8;
constexpr int NV_MAX = 3;  // 4 x 3 = 12 accumulators of 16 ymm registers
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

constexpr int64_t PAD = 16;  // padded dims (D, S) are multiples of this (and of VL)
constexpr int64_t MR = 4;    // query rows per micro-kernel call; masks are tracked per MR rows
constexpr int64_t RB = 64;   // query rows per block (bounds the per-thread scratch for long T)
constexpr float kMasked = -1e30f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

// Cephes-style expf, within ~1 ulp; 0 below -87.33 (so a -3.4e38 bias gives exactly 0); NaN in,
// NaN out.
inline vf vexp(vf x) {
  const vi under = x < splat(-87.3365447505531f);
  vf xc = under ? splat(0.f) : x;
  xc = xc > splat(88.0f) ? splat(88.0f) : xc;
  vf fx = xc * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);  // truncation; fix up to floor below
  vf nf = __builtin_convertvector(n, vf);
  const vi too_big = nf > fx;
  n = too_big ? n - 1 : n;
  nf = __builtin_convertvector(n, vf);
  vf r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  vf z = r * r;
  vf y = splat(1.9875691500E-4f);
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  vi bits = (n + 127) << 23;
  vf pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);
  y = y * pow2n;
  return under ? splat(0.f) : y;
}

// C[i, 0:NV*VL] (+)= sum_{p<kc} A[i, p] * B[p, 0:NV*VL] for i < M: the register-blocked core.
template <int M, int NV>
inline void micro(int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                  int64_t ldc, bool accumulate) {
  vf c[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) c[i][j] = accumulate ? load(C + i * ldc + j * VL) : vf{};
  for (int64_t p = 0; p < kc; ++p) {
    vf b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B + p * ldb + j * VL);
    for (int i = 0; i < M; ++i) {
      const vf a = splat(A[i * lda + p]);
      for (int j = 0; j < NV; ++j) c[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) store(C + i * ldc + j * VL, c[i][j]);
}

template <int M>
inline void rows_times(int64_t n, int64_t kc, const float* A, int64_t lda, const float* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + NV_MAX * VL <= n; j += NV_MAX * VL)
    micro<M, NV_MAX>(kc, A, lda, B + j, ldb, C + j, ldc, accumulate);
  switch ((n - j) / VL) {
    case 3: micro<M, 3>(kc, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 2: micro<M, 2>(kc, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 1: micro<M, 1>(kc, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    default: break;
  }
}

// C[m x n] (+)= A[m x kc] B[kc x n] for m <= MR rows; n a multiple of VL; row-major with strides.
inline void gemm_rows(int64_t m, int64_t n, int64_t kc, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (kc <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::memset(C + i * ldc, 0, n * sizeof(float));
    return;
  }
  switch (m) {
    case 4: rows_times<4>(n, kc, A, lda, B, ldb, C, ldc, accumulate); break;
    case 3: rows_times<3>(n, kc, A, lda, B, ldb, C, ldc, accumulate); break;
    case 2: rows_times<2>(n, kc, A, lda, B, ldb, C, ldc, accumulate); break;
    case 1: rows_times<1>(n, kc, A, lda, B, ldb, C, ldc, accumulate); break;
    default: break;
  }
}

struct Dims {
  int64_t N, T, S, H, K, D, G, Dp, Sp;
  float scale;
};

struct AlignedBuffer {
  float* data = nullptr;
  explicit AlignedBuffer(int64_t n) {
    data = static_cast<float*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * 4, 64)));
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// Key range [lo, hi) (multiples of PAD, hi <= Sp) that query micro block mb of batch n must visit.
void key_ranges(const Dims& d, const float* bias_n, std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
  const int64_t nmb = (d.T + MR - 1) / MR;
  lo.assign(nmb, 0);
  hi.assign(nmb, d.Sp);
  for (int64_t mb = 0; mb < nmb; ++mb) {
    int64_t first = d.S, last = -1;
    bool every_row_has_a_key = true;
    for (int64_t r = mb * MR; r < std::min(d.T, (mb + 1) * MR); ++r) {
      const float* row = bias_n + r * d.S;
      int64_t f = 0, l = d.S - 1;
      while (f < d.S && row[f] < kMasked) ++f;  // a NaN bias counts as a key (and reaches the output)
      while (l >= 0 && row[l] < kMasked) --l;
      if (f == d.S) { every_row_has_a_key = false; break; }
      first = std::min(first, f);
      last = std::max(last, l);
    }
    if (every_row_has_a_key) {
      lo[mb] = first / PAD * PAD;
      hi[mb] = std::min(d.Sp, round_up(last + 1, PAD));
    }
  }
}

// Runs body(unit, worker_scratch) for unit in [0, n) on the caller and the intra-op pool.
// Tasks that start after every unit is claimed return without touching `body`, and the caller
// waits for every claimed unit, so `body` (on the caller's stack) outlives all its uses.
template <typename Scratch, typename Body>
void parallel_units(ffi::ThreadPool& pool, int64_t n, const Dims& dims, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const Body* body_ptr = &body;
  const Dims* dims_ptr = &dims;
  auto work = [state, n, body_ptr, dims_ptr]() {
    std::unique_ptr<Scratch> scratch;
    int64_t finished = 0;
    for (int64_t u; (u = state->next.fetch_add(1)) < n;) {
      if (!scratch) scratch = std::make_unique<Scratch>(*dims_ptr);
      (*body_ptr)(u, *scratch);
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += finished;
      if (state->done == n) state->cv.notify_all();
    }
  };
  const int64_t workers = std::min<int64_t>(n, std::max<int64_t>(1, pool.num_threads()));
  for (int64_t w = 1; w < workers; ++w) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n; });
}

struct FwdScratch {
  AlignedBuffer kt, v, q, s, o;
  std::vector<int64_t> lo, hi;
  explicit FwdScratch(const Dims& d)
      : kt(d.D * d.Sp), v(d.Sp * d.Dp), q(RB * d.Dp), s(RB * d.Sp), o(RB * d.Dp) {}
};

// kv head kh of batch n from x [N, S, K, D]: transposed into xt[D][Sp], zero padded.
void load_kv_transposed(const Dims& d, const float* x, int64_t n, int64_t kh, float* xt) {
  std::memset(xt, 0, d.D * d.Sp * sizeof(float));
  for (int64_t s = 0; s < d.S; ++s) {
    const float* xs = x + ((n * d.S + s) * d.K + kh) * d.D;
    for (int64_t c = 0; c < d.D; ++c) xt[c * d.Sp + s] = xs[c];
  }
}

// kv head kh of batch n from x [N, S, K, D] as rows xr[Sp][Dp], zero padded.
void load_kv_rows(const Dims& d, const float* x, int64_t n, int64_t kh, float* xr) {
  std::memset(xr, 0, d.Sp * d.Dp * sizeof(float));
  for (int64_t s = 0; s < d.S; ++s)
    std::memcpy(xr + s * d.Dp, x + ((n * d.S + s) * d.K + kh) * d.D, d.D * sizeof(float));
}

// Rows [r0, r0 + nr) of head h in batch n -> dst[nr][Dp], zero padded.
void load_rows(const Dims& d, const float* x, int64_t n, int64_t h, int64_t r0, int64_t nr, float* dst) {
  for (int64_t i = 0; i < nr; ++i) {
    std::memcpy(dst + i * d.Dp, x + ((n * d.T + r0 + i) * d.H + h) * d.D, d.D * sizeof(float));
    std::memset(dst + i * d.Dp + d.D, 0, (d.Dp - d.D) * sizeof(float));
  }
}

// s[lo:hi] <- (s * scale + bias) over real keys, 0 beyond S; returns the row max over [lo, min(hi, S)).
inline float scale_and_bias(const Dims& d, float* s, const float* bias_row, int64_t lo, int64_t hi) {
  const int64_t end = std::min(hi, d.S);
  vf vmax = splat(-__builtin_inff());
  int64_t c = lo;
  for (; c + VL <= end; c += VL) {
    vf x = load(s + c) * d.scale + load(bias_row + c);
    store(s + c, x);
    vmax = x > vmax ? x : vmax;
    vmax = x != x ? x : vmax;  // keep NaN
  }
  float mx = vmax[0];
  for (int j = 1; j < VL; ++j) mx = (vmax[j] > mx || vmax[j] != vmax[j]) ? vmax[j] : mx;
  for (; c < end; ++c) {
    s[c] = s[c] * d.scale + bias_row[c];
    mx = (s[c] > mx || s[c] != s[c]) ? s[c] : mx;
  }
  for (c = end; c < hi; ++c) s[c] = 0.f;
  return mx;
}

// s[lo:end] <- exp(s - m) * inv_l (inv_l = 1 returns the plain exps); returns their sum.
inline float exp_row(float* s, int64_t lo, int64_t end, float m, float inv_l) {
  vf acc = vf{};
  int64_t c = lo;
  for (; c + VL <= end; c += VL) {
    vf e = vexp(load(s + c) - m) * inv_l;
    store(s + c, e);
    acc += e;
  }
  float sum = 0.f;
  for (int j = 0; j < VL; ++j) sum += acc[j];
  for (; c < end; ++c) {
    vf e = vexp(splat(s[c] - m)) * inv_l;
    s[c] = e[0];
    sum += e[0];
  }
  return sum;
}

void attention_fwd_unit(const Dims& d, const float* q, const float* k, const float* v, const float* bias,
                        float* o, float* m_out, float* l_out, int64_t unit, FwdScratch& w) {
  const int64_t n = unit / d.K, kh = unit % d.K;
  const float* bias_n = bias + n * d.T * d.S;
  load_kv_transposed(d, k, n, kh, w.kt.data);
  load_kv_rows(d, v, n, kh, w.v.data);
  key_ranges(d, bias_n, w.lo, w.hi);
  for (int64_t g = 0; g < d.G; ++g) {
    const int64_t h = kh * d.G + g;
    for (int64_t r0 = 0; r0 < d.T; r0 += RB) {
      const int64_t nr = std::min(RB, d.T - r0);
      load_rows(d, q, n, h, r0, nr, w.q.data);
      for (int64_t i0 = 0; i0 < nr; i0 += MR) {
        const int64_t mr = std::min(MR, nr - i0), mb = (r0 + i0) / MR;
        const int64_t lo = w.lo[mb], hi = w.hi[mb];
        float* s = w.s.data + i0 * d.Sp;
        gemm_rows(mr, hi - lo, d.D, w.q.data + i0 * d.Dp, d.Dp, w.kt.data + lo, d.Sp, s + lo, d.Sp, false);
        for (int64_t i = 0; i < mr; ++i) {
          const int64_t r = r0 + i0 + i;
          float* row = s + i * d.Sp;
          const float mx = scale_and_bias(d, row, bias_n + r * d.S, lo, hi);
          const int64_t end = std::min(hi, d.S);
          const float l = exp_row(row, lo, end, mx, 1.f);
          const float inv_l = 1.f / l;
          for (int64_t c = lo; c < end; ++c) row[c] *= inv_l;
          m_out[(n * d.H + h) * d.T + r] = mx;
          l_out[(n * d.H + h) * d.T + r] = l;
        }
        gemm_rows(mr, d.Dp, hi - lo, s + lo, d.Sp, w.v.data + lo * d.Dp, d.Dp, w.o.data + i0 * d.Dp, d.Dp,
                  false);
      }
      for (int64_t i = 0; i < nr; ++i)
        std::memcpy(o + ((n * d.T + r0 + i) * d.H + h) * d.D, w.o.data + i * d.Dp, d.D * sizeof(float));
    }
  }
}

struct BwdScratch {
  AlignedBuffer kt, vt, kr, dk, dv, q, dout, p, ds, pt, dst, dq;
  std::vector<int64_t> lo, hi, key_rlo, key_rhi;
  std::vector<float> delta;
  explicit BwdScratch(const Dims& d)
      : kt(d.D * d.Sp), vt(d.D * d.Sp), kr(d.Sp * d.Dp), dk(d.Sp * d.Dp), dv(d.Sp * d.Dp), q(RB * d.Dp),
        dout(RB * d.Dp), p(RB * d.Sp), ds(RB * d.Sp), pt(d.Sp * RB), dst(d.Sp * RB), dq(RB * d.Dp),
        delta(RB) {}
};

void attention_bwd_unit(const Dims& d, const float* q, const float* k, const float* v, const float* bias,
                        const float* o, const float* m_in, const float* l_in, const float* dout, float* dq,
                        float* dk, float* dv, int64_t unit, BwdScratch& w) {
  const int64_t n = unit / d.K, kh = unit % d.K;
  const float* bias_n = bias + n * d.T * d.S;
  load_kv_transposed(d, k, n, kh, w.kt.data);  // s = q . k^T
  load_kv_rows(d, k, n, kh, w.kr.data);        // dq = ds . k
  load_kv_transposed(d, v, n, kh, w.vt.data);  // dp = do . v^T
  std::memset(w.dk.data, 0, d.Sp * d.Dp * sizeof(float));
  std::memset(w.dv.data, 0, d.Sp * d.Dp * sizeof(float));
  key_ranges(d, bias_n, w.lo, w.hi);
  const int64_t nkb = d.Sp / MR;
  for (int64_t g = 0; g < d.G; ++g) {
    const int64_t h = kh * d.G + g;
    for (int64_t r0 = 0; r0 < d.T; r0 += RB) {
      const int64_t nr = std::min(RB, d.T - r0);
      load_rows(d, q, n, h, r0, nr, w.q.data);
      load_rows(d, dout, n, h, r0, nr, w.dout.data);
      for (int64_t i = 0; i < nr; ++i) {
        const float* orow = o + ((n * d.T + r0 + i) * d.H + h) * d.D;
        float acc = 0.f;
        for (int64_t c = 0; c < d.D; ++c) acc += orow[c] * w.dout.data[i * d.Dp + c];
        w.delta[i] = acc;
      }
      std::memset(w.pt.data, 0, d.Sp * RB * sizeof(float));
      std::memset(w.dst.data, 0, d.Sp * RB * sizeof(float));
      w.key_rlo.assign(nkb, RB);
      w.key_rhi.assign(nkb, 0);
      for (int64_t i0 = 0; i0 < nr; i0 += MR) {
        const int64_t mr = std::min(MR, nr - i0), mb = (r0 + i0) / MR;
        const int64_t lo = w.lo[mb], hi = w.hi[mb], end = std::min(hi, d.S);
        float* p = w.p.data + i0 * d.Sp;
        float* ds = w.ds.data + i0 * d.Sp;
        gemm_rows(mr, hi - lo, d.D, w.q.data + i0 * d.Dp, d.Dp, w.kt.data + lo, d.Sp, p + lo, d.Sp, false);
        gemm_rows(mr, hi - lo, d.D, w.dout.data + i0 * d.Dp, d.Dp, w.vt.data + lo, d.Sp, ds + lo, d.Sp, false);
        for (int64_t i = 0; i < mr; ++i) {
          const int64_t r = r0 + i0 + i;
          float* prow = p + i * d.Sp;
          float* dsrow = ds + i * d.Sp;
          scale_and_bias(d, prow, bias_n + r * d.S, lo, hi);
          const float mx = m_in[(n * d.H + h) * d.T + r];
          exp_row(prow, lo, end, mx, 1.f / l_in[(n * d.H + h) * d.T + r]);
          const float di = w.delta[i0 + i];
          for (int64_t c = lo; c < hi; ++c) dsrow[c] = c < end ? prow[c] * (dsrow[c] - di) : 0.f;
          for (int64_t c = lo; c < hi; ++c) {
            w.pt.data[c * RB + i0 + i] = prow[c];
            w.dst.data[c * RB + i0 + i] = dsrow[c];
          }
        }
        gemm_rows(mr, d.Dp, hi - lo, ds + lo, d.Sp, w.kr.data + lo * d.Dp, d.Dp, w.dq.data + i0 * d.Dp, d.Dp,
                  false);
        for (int64_t kb = lo / MR; kb < hi / MR; ++kb) {
          w.key_rlo[kb] = std::min(w.key_rlo[kb], i0);
          w.key_rhi[kb] = std::max(w.key_rhi[kb], i0 + mr);
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        float* dst_row = dq + ((n * d.T + r0 + i) * d.H + h) * d.D;
        for (int64_t c = 0; c < d.D; ++c) dst_row[c] = w.dq.data[i * d.Dp + c] * d.scale;
      }
      // dk += ds^T . q and dv += p^T . do, key micro block by key micro block, over the rows
      // that touch it.
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t rlo = w.key_rlo[kb], rhi = w.key_rhi[kb];
        if (rhi <= rlo) continue;
        const int64_t s0 = kb * MR;
        gemm_rows(MR, d.Dp, rhi - rlo, w.dst.data + s0 * RB + rlo, RB, w.q.data + rlo * d.Dp, d.Dp,
                  w.dk.data + s0 * d.Dp, d.Dp, true);
        gemm_rows(MR, d.Dp, rhi - rlo, w.pt.data + s0 * RB + rlo, RB, w.dout.data + rlo * d.Dp, d.Dp,
                  w.dv.data + s0 * d.Dp, d.Dp, true);
      }
    }
  }
  for (int64_t s = 0; s < d.S; ++s) {
    float* dks = dk + ((n * d.S + s) * d.K + kh) * d.D;
    float* dvs = dv + ((n * d.S + s) * d.K + kh) * d.D;
    for (int64_t c = 0; c < d.D; ++c) dks[c] = w.dk.data[s * d.Dp + c] * d.scale;
    std::memcpy(dvs, w.dv.data + s * d.Dp, d.D * sizeof(float));
  }
}

int64_t leading(ffi::Span<const int64_t> dims, size_t trailing) {
  int64_t n = 1;
  for (size_t i = 0; i + trailing < dims.size(); ++i) n *= dims[i];
  return n;
}

ffi::Error read_dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::F32>& bias, float scale, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), bd = bias.dimensions();
  if (qd.size() < 3 || kd.size() != qd.size() || vd.size() != qd.size() || bd.size() != qd.size() - 1)
    return ffi::Error::InvalidArgument(
        "fedrouter attention: expected q [..., T, H, D], k and v [..., S, K, D], bias [..., T, S]");
  const size_t r = qd.size();
  d->N = leading(qd, 3);
  d->T = qd[r - 3];
  d->H = qd[r - 2];
  d->D = qd[r - 1];
  d->S = kd[r - 3];
  d->K = kd[r - 2];
  if (leading(kd, 3) != d->N || leading(vd, 3) != d->N || leading(bd, 2) != d->N || kd[r - 1] != d->D ||
      vd[r - 1] != d->D || vd[r - 3] != d->S || vd[r - 2] != d->K || bd[r - 3] != d->T || bd[r - 2] != d->S)
    return ffi::Error::InvalidArgument("fedrouter attention: q, k, v and bias shapes disagree");
  if (d->K <= 0 || d->H % d->K != 0)
    return ffi::Error::InvalidArgument("fedrouter attention: query heads must be a multiple of kv heads");
  d->G = d->H / d->K;
  d->Dp = round_up(d->D, PAD);
  d->Sp = round_up(d->S, PAD);
  d->scale = scale;
  return ffi::Error::Success();
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o,
                        ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> l, float scale) {
  Dims d;
  if (auto err = read_dims(q, k, v, bias, scale, &d); err.failure()) return err;
  if (d.N * d.T == 0) return ffi::Error::Success();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *bp = bias.typed_data();
  float *op = o->typed_data(), *mp = m->typed_data(), *lp = l->typed_data();
  auto body = [&](int64_t unit, FwdScratch& w) { attention_fwd_unit(d, qp, kp, vp, bp, op, mp, lp, unit, w); };
  parallel_units<FwdScratch>(pool, d.N * d.K, d, body);
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> o,
                        ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> l, ffi::Buffer<ffi::F32> dout,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Dims d;
  if (auto err = read_dims(q, k, v, bias, scale, &d); err.failure()) return err;
  if (d.N * d.K == 0) return ffi::Error::Success();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *bp = bias.typed_data();
  const float *op = o.typed_data(), *mp = m.typed_data(), *lp = l.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  auto body = [&](int64_t unit, BwdScratch& w) {
    attention_bwd_unit(d, qp, kp, vp, bp, op, mp, lp, dop, dqp, dkp, dvp, unit, w);
  };
  parallel_units<BwdScratch>(pool, d.N * d.K, d, body);
  return ffi::Error::Success();
}

using F32Buffer = ffi::Buffer<ffi::F32>;

// The pool and q, k, v, bias [..., T, S]: the operands both handlers start with.
auto bind_attention_operands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<F32Buffer>()
      .Arg<F32Buffer>()
      .Arg<F32Buffer>()
      .Arg<F32Buffer>();
}

}  // namespace

// -> o, row max, row sum.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FedrouterAttentionFwd, AttentionFwd,
                              bind_attention_operands()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("scale"));

// o, row max, row sum, d o -> d q, d k, d v.
XLA_FFI_DEFINE_HANDLER_SYMBOL(FedrouterAttentionBwd, AttentionBwd,
                              bind_attention_operands()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("scale"));
