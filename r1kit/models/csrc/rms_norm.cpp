// RMSNorm forward and backward over the rows of an fp32 tensor (CPU). Loaded by r1kit/models/kernels.py.
//
// Why: torch 2.13 builds F.rms_norm's backward out of the composite's pieces (pow, mean, rsqrt, three
// products and their gradients): on a GRPO step's packed activations (≈ 5k tokens × 128) it takes
// ≈ 6 ms where one pass over x, dy and w does it in well under one. The forward is the one the fused
// decode layers use (llama_decode.cpp), so a trainer's forward and the engine's normalise alike.
//
//   y = x · r · w,   r = 1 / sqrt(mean(x²) + eps)                                  (per row)
//   dx = r · (g − x̂ · mean(g · x̂)),  g = dy · w,  x̂ = x · r;   dw = Σ_rows dy · x̂
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

// y = x / sqrt(mean(x²) + eps) · w over `rows` rows of length n (x and y may alias)
void rms_norm_rows(const float* x, float* y, const float* w, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r, x += n, y += n) {
    double ss = 0.0;  // in double: a row of a real model's large activations summed in float drifts (1e-5 in the logits)
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
  }
}

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(),
              name, " must be a contiguous fp32 CPU tensor");
}

}  // namespace

// x (..., n), w (n,) → y (..., n)
torch::Tensor rms_norm_forward(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check(x, "x");
  check(w, "w");
  const int64_t n = w.numel(), rows = x.numel() / n;
  TORCH_CHECK(x.size(-1) == n, "x's last axis must match w");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t a, int64_t b) {
    rms_norm_rows(xp + a * n, yp + a * n, w.data_ptr<float>(), b - a, n, static_cast<float>(eps));
  });
  return y;
}

// (x, w, dy) → (dx, dw); dw summed over row blocks fixed by the row count alone, then block by block in order:
// the same bits whatever the number of threads
std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& dy,
                                             double eps) {
  check(x, "x");
  check(w, "w");
  check(dy, "dy");
  const int64_t n = w.numel(), rows = x.numel() / n;
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have x's shape");
  auto dx = torch::empty_like(x);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, (rows + 255) / 256));
  std::vector<float> partial(chunks * n, 0.f);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *gp = dy.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  const int64_t per = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* dw = partial.data() + c * n;
      for (int64_t r = c * per; r < std::min(rows, (c + 1) * per); ++r) {
        const float *xr = xp + r * n, *gr = gp + r * n;
        double ss = 0.0, dot = 0.0;
        for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
        const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
        for (int64_t i = 0; i < n; ++i) dot += static_cast<double>(gr[i] * wp[i]) * (xr[i] * inv);  // Σ g · x̂
        const float mean = static_cast<float>(dot / static_cast<double>(n));
        float* dxr = dxp + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const float xh = xr[i] * inv;
          dxr[i] = inv * (gr[i] * wp[i] - xh * mean);
          dw[i] += gr[i] * xh;
        }
      }
    }
  });
  auto dw = torch::zeros_like(w);
  float* dwp = dw.data_ptr<float>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < n; ++i) dwp[i] += partial[c * n + i];
  return {dx, dw};
}
