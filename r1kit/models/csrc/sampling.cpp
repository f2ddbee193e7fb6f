// One draw per row from the untruncated tempered distribution (and greedy rows), fp32, AVX2.
// Loaded by r1kit/models/kernels.py; r1kit/sampling.py calls it for the rows it covers.
//
// Why: sampling.py's untruncated draw is ~20 torch ops (log-softmax, block sums, two cumulative sums,
// two searches, gathers): at a decode step's 16–128 rows each costs its dispatch, 0.17–0.22 ms in all
// against the 0.9 ms of a small model's matmuls, and over a 49k vocabulary 5 ms for 16 rows (the
// log-softmax and the exp written to memory and read back). Here each row is two passes over its
// logits, the exps kept in a scratch row.
//
// The same draw as sampling.py's _draw_full: temperature T divides the logits; the token is found by
// inverse CDF in id order — the one whose cumulative mass interval holds u·mass — in two levels (blocks
// of 256 ids, then inside the block); its log-prob is z_i/T − logsumexp(z/T). Greedy rows (T = 0) take
// the first largest logit and the raw log-softmax. Sums are in double; the result can differ from the
// torch path only where u·mass falls within rounding of a boundary between two tokens.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "vec.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // ids per block of the two-level search (sampling.py's block)

// max of z[0..V)
float row_max(const float* z, int64_t V) {
  __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= V; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(z + j));
  float m = r1kit_vec::hmax(m8);
  for (; j < V; ++j) m = std::max(m, z[j]);
  return m;
}

// e[j] = exp(z[j]/T − zmax/T) for j < V; block sums of e into blocks (in double); returns their total
double exps(const float* z, int64_t V, float T, float zmax, float* e, std::vector<double>& blocks) {
  const __m256 t8 = _mm256_set1_ps(T), m8 = _mm256_set1_ps(zmax / T);
  double total = 0;
  for (int64_t b0 = 0, bi = 0; b0 < V; b0 += kBlock, ++bi) {
    const int64_t end = std::min(V, b0 + kBlock);
    __m256 s8 = _mm256_setzero_ps();
    int64_t j = b0;
    for (; j + 8 <= end; j += 8) {
      const __m256 v = r1kit_vec::exp256(_mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(z + j), t8), m8));
      _mm256_storeu_ps(e + j, v);
      s8 = _mm256_add_ps(s8, v);
    }
    double s = r1kit_vec::hsum(s8);
    for (; j < end; ++j) {
      e[j] = std::exp(z[j] / T - zmax / T);
      s += e[j];
    }
    blocks[bi] = s;
    total += s;
  }
  return total;
}

// the id whose cumulative mass interval holds target (0 ≤ target < total); past the last token with mass
// only by rounding, so it stays on that one
int64_t inverse_cdf(const float* e, int64_t V, const std::vector<double>& blocks, double target) {
  int64_t bi = 0, nb = static_cast<int64_t>(blocks.size());
  double c = 0;
  while (bi + 1 < nb && c + blocks[bi] <= target) c += blocks[bi++];
  int64_t last = -1;
  for (int64_t j = bi * kBlock, end = std::min(V, (bi + 1) * kBlock); j < end; ++j) {
    if (e[j] > 0) last = j;
    c += e[j];
    if (c > target && e[j] > 0) return j;
  }
  if (last >= 0) return last;
  for (int64_t j = V - 1; j >= 0; --j)  // the target lay past every block with mass: the last such token
    if (e[j] > 0) return j;
  return 0;
}

}  // namespace

// logits (n, V) fp32 contiguous, temperature (n,) (0 → greedy), top_p (n,), top_k (n,) int64, u (n,) in [0, 1)
// → tokens (n,) int64, log-probs (n,) fp32; nothing (an empty list) when a sampled row is truncated
// (top_p < 1 or top_k > 0): the caller's torch path draws those. Checked here, on the host copies, so a
// decode step spends no torch op on finding out (sampling.py's test costs seven)
std::vector<torch::Tensor> sample_untruncated(const torch::Tensor& logits, const torch::Tensor& temperature,
                                              const torch::Tensor& top_p, const torch::Tensor& top_k,
                                              const torch::Tensor& u) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "sample_untruncated: logits (n, V) contiguous fp32 expected");
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 && temperature.numel() == n && top_p.numel() == n && top_k.numel() == n && u.numel() == n,
              "sample_untruncated: (n,) temperature, top_p, top_k and u");
  auto t = temperature.to(at::kFloat).contiguous(), uu = u.to(at::kFloat).contiguous();
  auto pp = top_p.to(at::kFloat).contiguous();
  auto kk = top_k.to(at::kLong).contiguous();
  const float* tp = t.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r)
    if (tp[r] != 0.f && (pp.data_ptr<float>()[r] < 1.f || kk.data_ptr<int64_t>()[r] > 0)) return {};
  auto tokens = torch::empty({n}, logits.options().dtype(at::kLong));
  auto logp = torch::empty({n}, logits.options());
  const float* z0 = logits.data_ptr<float>();
  const float* up = uu.data_ptr<float>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = logp.data_ptr<float>();
  at::parallel_for(0, n, 4, [&](int64_t lo, int64_t hi) {
    std::vector<float> e(V);
    std::vector<double> blocks((V + kBlock - 1) / kBlock);
    for (int64_t r = lo; r < hi; ++r) {
      const float* z = z0 + r * V;
      const float zmax = row_max(z, V);
      const bool greedy = tp[r] == 0.f;
      const float T = greedy ? 1.f : tp[r];
      const double total = exps(z, V, T, zmax, e.data(), blocks);
      int64_t i = 0;
      if (greedy) {
        while (i + 1 < V && z[i] != zmax) ++i;  // the first largest
      } else {
        i = inverse_cdf(e.data(), V, blocks, static_cast<double>(up[r]) * total);
      }
      tok[r] = i;
      lp[r] = static_cast<float>(static_cast<double>(z[i] / T - zmax / T) - std::log(total));
    }
  });
  return {tokens, logp};
}
