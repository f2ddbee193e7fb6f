// SwiGLU's gate, silu(a) · b, forward and backward in one pass each (fp32, CPU, AVX2).
// Loaded by r1kit/models/kernels.py (kernels.swiglu): every Llama-family MLP on a CPU in fp32, and the
// fused decode layers (llama_decode.cpp).
//
// Why: eager, the gate is F.silu then a product, and autograd's backward three more elementwise passes
// (the product's two gradients, silu's) over (tokens × ffn) tensors: on a GRPO step's packed batch
// (4930 × 352 per layer) those memory-bound passes took ≈ 35 ms of a 290 ms forward + backward.
//
//   y = a · σ(a) · b;   da = g · b · σ(a) · (1 + a · (1 − σ(a))),   db = g · a · σ(a)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "vec.h"

#include <cmath>
#include <vector>

namespace {

inline __m256 sigmoid8(__m256 a) {  // 1 / (1 + e^−a); e^−a through the shared exp (−a ≥ 88 → inf → 0)
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, r1kit_vec::exp256(_mm256_sub_ps(_mm256_setzero_ps(), a))));
}

inline float sigmoid1(float a) { return 1.f / (1.f + std::exp(-a)); }

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(),
              "swiglu: ", name, " must be a contiguous fp32 CPU tensor");
}

constexpr int64_t kGrain = 1 << 14;  // elements per parallel chunk

}  // namespace

// y = silu(a) · b into y (may alias a); n elements
void swiglu_rows(const float* a, const float* b, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 av = _mm256_loadu_ps(a + i);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(av, sigmoid8(av)), _mm256_loadu_ps(b + i)));
  }
  for (; i < n; ++i) y[i] = a[i] * sigmoid1(a[i]) * b[i];
}

torch::Tensor swiglu_forward(const torch::Tensor& a, const torch::Tensor& b) {
  check(a, "a");
  check(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes(), "swiglu: a and b must have one shape, got ", a.sizes(), " and ", b.sizes());
  auto y = torch::empty_like(a);
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) { swiglu_rows(ap + lo, bp + lo, yp + lo, hi - lo); });
  return y;
}

std::vector<torch::Tensor> swiglu_backward(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& g) {
  check(a, "a");
  check(b, "b");
  check(g, "grad");
  auto da = torch::empty_like(a), db = torch::empty_like(b);
  const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(), *gp = g.data_ptr<float>();
  float *dap = da.data_ptr<float>(), *dbp = db.data_ptr<float>();
  at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    const __m256 one = _mm256_set1_ps(1.f);
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
      const __m256 av = _mm256_loadu_ps(ap + i), bv = _mm256_loadu_ps(bp + i), gv = _mm256_loadu_ps(gp + i);
      const __m256 s = sigmoid8(av), silu = _mm256_mul_ps(av, s);
      _mm256_storeu_ps(dbp + i, _mm256_mul_ps(gv, silu));
      const __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(av, _mm256_sub_ps(one, s), one));  // σ(1 + a(1 − σ))
      _mm256_storeu_ps(dap + i, _mm256_mul_ps(_mm256_mul_ps(gv, bv), dsilu));
    }
    for (; i < hi; ++i) {
      const float s = sigmoid1(ap[i]);
      dbp[i] = gp[i] * ap[i] * s;
      dap[i] = gp[i] * bp[i] * s * (1.f + ap[i] * (1.f - s));
    }
  });
  return {da, db};
}
