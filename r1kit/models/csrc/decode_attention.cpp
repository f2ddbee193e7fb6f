// Attention for the few new queries of a decode step, fp32, AVX2 + FMA.  Loaded by r1kit/models/kernels.py.
//
// Why a kernel of our own: at one query per row, torch's CPU SDPA (flash) reads the KV cache at
// 2.4–4.8 GB/s on this box while a plain pass over the same strided cache slices runs at 7–11 GB/s
// (128 rows × 4 heads × 60 keys × 32 dims; 16 rows × 9/3 heads × 200–400 keys × 64 dims). A decode
// query does 4 FLOP per cached float, so the cache read is all that should cost.
//
// The contract is SDPA's: q (B, H, Tq, Dk), k (B, Hkv, Tk, Dk), v (B, Hkv, Tk, Dv), H a multiple of
// Hkv (grouped-query heads share a KV head), an optional mask (B, 1, Tq, Tk) — additive fp32 or
// boolean (true = attend) — and out = softmax(q kᵀ · scale + mask) v; a query with no key to attend
// gets zeros, as SDPA gives. Any strides except a contiguous last axis, so the cache's (B, Hkv,
// max_len, D) buffers are read in place through their [:Tk] views.
//
// Shape of the computation: one work item per (row, KV head) — its keys and values are read once
// while every query head of the group and every query uses them. Scores 8 keys at a time (8 dot
// products in 8 accumulators, folded into one vector), keys past a query's last visible one are
// never read, softmax with a vectorised exp, then out = Σ p_j v_j in registers. Each output depends
// on its own row only, summed in one order: decoding through it is batch-invariant.
//
// Measured and not kept (Zen 4, 16 rows, the medium config's 8 layers, cache out of L3): this kernel reads
// the cache at 6–7 GB/s (≈ 20 in L2/L3; a bare read of the same slices, keys then values, 9 GB/s). A one-pass
// online softmax over 8- and 32-key blocks (keys and values side by side, every group head per block) was
// 1.2–1.4× slower, its per-block rescaling costing more than the second stream saved; software prefetch of
// the next item's or of this block's values, into L1 or L2, gained nothing.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "vec.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

using r1kit_vec::exp256;
using r1kit_vec::hmax;
using r1kit_vec::hsum;

// 8 accumulators → one vector of their 8 sums (lane i = Σ a[i])
inline __m256 fold8(const __m256 a[8]) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // each 128-bit half holds partial sums: low halves of keys 0-3 | 4-7, high halves likewise
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

struct View {  // a 4-d tensor's data and strides in elements (the last axis contiguous)
  const char* base; int64_t s0, s1, s2; int64_t elem;
  template <typename T> const T* at(int64_t a, int64_t b, int64_t c) const {
    return reinterpret_cast<const T*>(base + (a * s0 + b * s1 + c * s2) * elem);
  }
};

View view_of(const torch::Tensor& t) {
  return View{static_cast<const char*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2),
              static_cast<int64_t>(t.element_size())};
}

struct Problem {
  View q, k, v, mask;
  bool has_mask, bool_mask;
  int64_t H, Hkv, Tq, Tk, Dk, Dv;
  float scale;
  float* out;  // (B, Tq, H, Dv) contiguous
};

// scores[0..n) = q·k_j · scale + mask_j for one query; n = 1 + the last key it may see (0: none)
int64_t scores_of(const Problem& p, int64_t b, int64_t hk, const float* q, const float* madd, const bool* mbool,
                  float* s) {
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t n = p.Tk;
  if (p.has_mask) {  // keys after the last visible one are never read (a ragged row's empty slots)
    if (p.bool_mask) while (n > 0 && !mbool[n - 1]) --n;
    else while (n > 0 && madd[n - 1] == ninf) --n;
  }
  const int64_t D = p.Dk;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(p.k.at<float>(b, hk, j + i) + d), acc[i]);
    }
    _mm256_storeu_ps(s + j, _mm256_mul_ps(fold8(acc), _mm256_set1_ps(p.scale)));
  }
  for (; j < n; ++j) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(p.k.at<float>(b, hk, j) + d), acc);
    s[j] = hsum(acc) * p.scale;
  }
  if (p.has_mask) {
    for (j = 0; j < n; ++j) s[j] = p.bool_mask ? (mbool[j] ? s[j] : ninf) : s[j] + madd[j];
  }
  return n;
}

// s[0..n) → e^(s - max), returned with their sum (0 when every key is masked)
float softmax_numerators(float* s, int64_t n) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
  float m = hmax(mv);
  for (; j < n; ++j) m = std::max(m, s[j]);
  if (m == -std::numeric_limits<float>::infinity()) return 0.f;
  const __m256 m8 = _mm256_set1_ps(m);
  __m256 sum8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum(sum8);
  if (j < n) {  // the last < 8 scores through the same exp, padded with -inf
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = j + i < n ? s[j + i] - m : -std::numeric_limits<float>::infinity();
    _mm256_store_ps(tail, exp256(_mm256_load_ps(tail)));
    for (int i = 0; j + i < n; ++i) { s[j + i] = tail[i]; sum += tail[i]; }
  }
  return sum;
}

// out[0..Dv) = Σ_j w_j v_j / sum, 64 dims (8 registers) at a time
void weighted_values(const Problem& p, int64_t b, int64_t hk, const float* w, int64_t n, float sum, float* out) {
  const __m256 inv = _mm256_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
  for (int64_t d0 = 0; d0 < p.Dv; d0 += 64) {
    const int chunks = static_cast<int>(std::min<int64_t>(64, p.Dv - d0) / 8);
    __m256 acc[8];
    for (int c = 0; c < chunks; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 wj = _mm256_set1_ps(w[j]);
      const float* vj = p.v.at<float>(b, hk, j) + d0;
      for (int c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(vj + 8 * c), acc[c]);
    }
    for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(acc[c], inv));
  }
}

void row_head(const Problem& p, int64_t b, int64_t hk, std::vector<float>& s) {
  const int64_t group = p.H / p.Hkv;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t t = 0; t < p.Tq; ++t) {
      const float* madd = p.has_mask && !p.bool_mask ? p.mask.at<float>(b, 0, t) : nullptr;
      const bool* mbool = p.has_mask && p.bool_mask ? p.mask.at<bool>(b, 0, t) : nullptr;
      const int64_t n = scores_of(p, b, hk, p.q.at<float>(b, h, t), madd, mbool, s.data());
      const float sum = softmax_numerators(s.data(), n);
      weighted_values(p, b, hk, s.data(), n, sum, p.out + ((b * p.Tq + t) * p.H + h) * p.Dv);
    }
  }
}

}  // namespace

// Whether the inputs are inside this kernel's contract (see the header): fp32 4-d q, k, v on the CPU with
// matching shapes, grouped heads, head dims that are multiples of 8, contiguous last axes, 1..max_queries
// queries, and a (B, 1, Tq, Tk) fp32 / bool mask with a contiguous last axis — or none for one query
// (several without a mask mean causal: SDPA's). One function, so Python asks here and nowhere else.
bool decode_attention_applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const c10::optional<torch::Tensor>& mask, int64_t max_queries) {
  for (const auto* t : {&q, &k, &v})
    if (t->dim() != 4 || t->scalar_type() != at::kFloat || !t->device().is_cpu() || t->stride(3) != 1) return false;
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dk = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  if (k.size(0) != B || k.size(3) != Dk || v.size(0) != B || v.size(1) != Hkv || v.size(2) != Tk) return false;
  if (Hkv == 0 || H % Hkv != 0 || Dk % 8 != 0 || v.size(3) % 8 != 0 || Tq < 1 || Tq > max_queries) return false;
  if (!mask.has_value() || !mask->defined()) return Tq == 1;
  const auto& m = *mask;
  return (m.scalar_type() == at::kFloat || m.scalar_type() == at::kBool) && m.device().is_cpu() && m.dim() == 4 &&
         m.size(0) == B && m.size(1) == 1 && m.size(2) == Tq && m.size(3) == Tk && m.stride(3) == 1;
}

// see the header → (B, H, Tq, Dv), a view of a (B, Tq, H, Dv) tensor (the layout wo reads); None when the
// inputs are outside the contract (decode_attention_applies), so the caller runs SDPA instead
c10::optional<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              const c10::optional<torch::Tensor>& mask, double scale,
                                              int64_t max_queries) {
  if (!decode_attention_applies(q, k, v, mask, max_queries)) return c10::nullopt;
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dk = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2), Dv = v.size(3);
  Problem p{};
  p.q = view_of(q); p.k = view_of(k); p.v = view_of(v);
  p.H = H; p.Hkv = Hkv; p.Tq = Tq; p.Tk = Tk; p.Dk = Dk; p.Dv = Dv; p.scale = static_cast<float>(scale);
  if (mask.has_value() && mask->defined()) {
    p.has_mask = true; p.bool_mask = mask->scalar_type() == at::kBool; p.mask = view_of(*mask);
  }
  auto out = torch::empty({B, Tq, H, Dv}, q.options());
  p.out = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(Tk + 8);
    for (int64_t i = lo; i < hi; ++i) row_head(p, i / Hkv, i % Hkv, s);
  });
  return out.transpose(1, 2);
}
