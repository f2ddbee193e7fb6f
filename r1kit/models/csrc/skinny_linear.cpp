// y = x Wᵀ (+ b) for the few rows of a decode step, fp32, from a packed copy of W.  Loaded by r1kit/models/kernels.py.
//
// Why a kernel of our own: at 16 rows, MKL's sgemm (torch's F.linear) reads each weight at ≈ 3.7 GB/s on
// an AVX2 box while one core streams 13 GB/s; it is neither compute- nor bandwidth-bound (it packs the
// weight panel on every call). Here the weight is packed once per decode session (kernels.WeightPacks: a
// Batch's life, repacked when the weight's version moves), so a call only streams the packed panels.
//
// Layout: pack_weight(W (N, K)) → (P, K, C): panel p holds output columns p·C … p·C + C − 1 (zero past N),
// K rows of C floats, C = 48 (3 zmm vectors) with AVX-512, 16 (2 ymm) with AVX2. A tile is MB rows of x × one
// panel: for each k, C weights are loaded once and every row's x[m, k] broadcast against them — an outer
// product into the tile's accumulators (8 rows × 3 of the 32 zmm registers, 6 × 2 of the 16 ymm ones), no
// horizontal sums. Each panel comes from memory once per call (the other row blocks find it in L2), in one
// sequential stream that the next panel's prefetch runs ahead of; the call's last panel prefetches the first of
// `then`, the panels of the matmul that follows (a decode step's next weight: without it each call's first panel
// came cold from memory — the medium config's streamed matmuls 1.13× faster with it, the SmolLM2 shape's 1.05×).
//
// Summation order: every output y[m, n] is Σ_k x[m, k]·W[n, k] accumulated in k order, one FMA per k, in
// its own lane — whatever the number of rows, the row's tile, the panel width or the thread: results are
// batch-invariant, and both vector widths give the same bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

struct Args {
  const float* x; const float* packed; const float* bias; float* y;
  int64_t M, K, N;
  int64_t panels;
  const float* then; int64_t then_k;  // the next call's first panel and its K (prefetched by the last panel)
};

// MB rows of x (row stride K) × the panel at `panel` (K × C) → y rows (stride N), `cols` of the C columns real
// -O2 for this one: GCC 12 at -O3 stores every accumulator to the stack on every k of this loop (never read
// back), which halves its FMA rate; the 16-wide tiles below do not get that code
template <int MB>
__attribute__((optimize("O2"))) void tile256(const Args& a, const float* x, const float* panel, float* y,
                                             int64_t cols, const float* bias, const float* next, int64_t next_k) {
  constexpr int C = 16;
  __m256 lo[MB], hi[MB];  // columns 0–7 and 8–15 of each row
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  const int64_t K = a.K;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * C;
    if (next != nullptr && k < next_k)  // the next panel, 64 bytes a k: one line
      _mm_prefetch(reinterpret_cast<const char*>(next + k * C), _MM_HINT_T1);
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_broadcast_ss(x + i * K + k);
      lo[i] = _mm256_fmadd_ps(xv, w0, lo[i]);
      hi[i] = _mm256_fmadd_ps(xv, w1, hi[i]);
    }
  }
  alignas(32) float out[MB][C];  // the accumulators at constant indices, then the real columns
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
    _mm256_store_ps(&out[i][0], lo[i]), _mm256_store_ps(&out[i][8], hi[i]);
  for (int i = 0; i < MB; ++i)
    for (int64_t j = 0; j < cols; ++j) y[i * a.N + j] = out[i][j] + (bias != nullptr ? bias[j] : 0.f);
}

}  // namespace


// -- the 16-wide tiles: compiled for AVX-512 only inside this region (everything torch's headers define lies
// above it, so no inline function of theirs is built for a CPU the process may not have) -------------------
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace {

template <int MB>
void tile512(const Args& a, const float* x, const float* panel, float* y, int64_t cols, const float* bias,
             const float* next, int64_t next_k) {
  constexpr int C = 48;
  __m512 acc[MB][3];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 3; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = a.K;
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * C;
    if (next != nullptr && k < next_k) {  // the next panel, 192 bytes a k: three lines in the time of 3·MB FMAs
      _mm_prefetch(reinterpret_cast<const char*>(next + k * C), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + k * C + 16), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + k * C + 32), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * K + k]);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, w2, acc[i][2]);
    }
  }
  alignas(64) float out[MB][C];  // the accumulators at constant indices, then the real columns
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 3; ++j) _mm512_store_ps(&out[i][16 * j], acc[i][j]);
  for (int i = 0; i < MB; ++i)
    for (int64_t j = 0; j < cols; ++j) y[i * a.N + j] = out[i][j] + (bias != nullptr ? bias[j] : 0.f);
}

struct Wide {  // the 16-wide tile family: 48-column panels, row blocks of 8
  static constexpr int C = 48, MB = 8;
  template <int R>
  static void run(const Args& a, const float* x, const float* panel, float* y, int64_t cols, const float* bias,
                  const float* next, int64_t next_k) {
    tile512<R>(a, x, panel, y, cols, bias, next, next_k);
  }
};

}  // namespace
#pragma GCC pop_options

namespace {

struct Narrow {  // the AVX2 tile family: 16-column panels, row blocks of 6
  static constexpr int C = 16, MB = 6;
  template <int R>
  static void run(const Args& a, const float* x, const float* panel, float* y, int64_t cols, const float* bias,
                  const float* next, int64_t next_k) {
    tile256<R>(a, x, panel, y, cols, bias, next, next_k);
  }
};

// the R-row tile of family T for rows = R, else the next smaller one (the rows left after a panel's full blocks)
template <typename T, int R>
void tail(int64_t rows, const Args& a, const float* x, const float* panel, float* y, int64_t cols,
          const float* bias, const float* next, int64_t next_k) {
  if constexpr (R > 0) {
    if (rows == R) return T::template run<R>(a, x, panel, y, cols, bias, next, next_k);
    tail<T, R - 1>(rows, a, x, panel, y, cols, bias, next, next_k);
  }
}

// every row of x against panel p (`end`: one past this thread's last panel): row blocks of T::MB, then one tile of
// the rest; the first block prefetches the next panel, the others find this one in L2
template <typename T>
void panel(const Args& a, int64_t p, int64_t end) {
  constexpr int C = T::C;
  const float* panel = a.packed + p * a.K * C;
  // the next panel of this thread's, else (the call's last panel) the next call's first
  const float* next = p + 1 < end ? panel + a.K * C : p + 1 == a.panels ? a.then : nullptr;
  const int64_t next_k = p + 1 < end ? a.K : a.then_k;
  const int64_t n = p * C, cols = std::min<int64_t>(C, a.N - n);
  const float* bias = a.bias != nullptr ? a.bias + n : nullptr;
  int64_t m = 0;
  for (; m + T::MB <= a.M; m += T::MB)
    T::template run<T::MB>(a, a.x + m * a.K, panel, a.y + m * a.N + n, cols, bias, m == 0 ? next : nullptr, next_k);
  tail<T, T::MB - 1>(a.M - m, a, a.x + m * a.K, panel, a.y + m * a.N + n, cols, bias, m == 0 ? next : nullptr, next_k);
}

// 512 where the CPU (and the OS) run AVX-512, else 256; set_vector_width narrows it (tests run both kernels)
int64_t g_width = __builtin_cpu_supports("avx512f") ? 512 : 256;

}  // namespace

int64_t vector_width() { return g_width; }

// 256 or 512 (the latter only where the CPU has AVX-512); returns the width now in use
int64_t set_vector_width(int64_t bits) {
  TORCH_CHECK(bits == 256 || bits == 512, "set_vector_width: 256 or 512, got ", bits);
  g_width = bits == 512 && __builtin_cpu_supports("avx512f") ? 512 : 256;
  return g_width;
}

// weight (N, K) contiguous fp32 → its panels (ceil(N / C), K, C) for the vector width in use, C = 48 or 16
torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "pack_weight: a contiguous fp32 (N, K) weight expected, got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1), C = g_width == 512 ? 48 : 16, P = (N + C - 1) / C;
  auto out = torch::zeros({P, K, C}, weight.options());
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p)
      for (int64_t j = 0; j < C && p * C + j < N; ++j) {
        const float* src = w + (p * C + j) * K;  // column p·C + j of Wᵀ: one row of W
        float* dst = o + p * K * C + j;
        for (int64_t k = 0; k < K; ++k) dst[k * C] = src[k];
      }
  });
  return out;
}

// x (…, K) contiguous; packed = pack_weight(W) for W (N, K); bias (N,) or None; then: the panels of the matmul
// that follows, or None (only prefetched); all fp32, on the CPU → y (…, N): the leading axes are the rows (taken
// and given back here, so a decode step's call costs no reshape in Python)
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                            const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& then) {
  TORCH_CHECK(x.dim() >= 1 && packed.dim() == 3 && x.size(-1) == packed.size(1) &&
              (packed.size(2) == 48 || packed.size(2) == 16) && packed.size(0) * packed.size(2) >= N &&
              (packed.size(0) - 1) * packed.size(2) < N,
              "skinny_linear: x (..., K) and pack_weight's (P, K, 48 | 16) panels of N columns expected, got ",
              x.sizes(), ", ", packed.sizes(), " and N = ", N);
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && x.scalar_type() == at::kFloat &&
              packed.scalar_type() == at::kFloat, "skinny_linear: contiguous fp32 tensors expected");
  const bool wide = packed.size(2) == 48;
  TORCH_CHECK(!wide || __builtin_cpu_supports("avx512f"), "skinny_linear: 48-wide panels need AVX-512");
  Args a{};
  a.K = x.size(-1); a.M = 1; a.N = N;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) a.M *= x.size(i);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = torch::empty(shape, x.options());
  a.x = x.data_ptr<float>(); a.packed = packed.data_ptr<float>(); a.y = y.data_ptr<float>();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kFloat,
                "skinny_linear: bias (N,) fp32 expected");
    a.bias = bias->data_ptr<float>();
  }
  if (a.M == 0 || N == 0) return y;
  if (a.K == 0) {  // no terms: the bias alone
    y.zero_();
    return a.bias != nullptr ? y.add_(*bias) : y;
  }
  const int64_t panels = packed.size(0);
  a.panels = panels;
  if (then.has_value() && then->defined()) {
    TORCH_CHECK(then->dim() == 3 && then->is_contiguous() && then->scalar_type() == at::kFloat &&
                then->size(2) == packed.size(2), "skinny_linear: `then` must be pack_weight's panels of this width (",
                packed.size(2), " columns), got ", then->sizes());
    a.then = then->data_ptr<float>(); a.then_k = then->size(1);
  }
  at::parallel_for(0, panels, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      if (wide) panel<Wide>(a, p, hi);
      else panel<Narrow>(a, p, hi);
    }
  });
  return y;
}
