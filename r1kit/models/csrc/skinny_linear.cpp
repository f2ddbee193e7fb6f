// y = x Wᵀ (+ b) for the few rows of a decode step, fp32, AVX2 + FMA.  Loaded by r1kit/models/kernels.py.
//
// Why a kernel of our own: at 16 rows, MKL's sgemm (torch's F.linear) reads each weight at ≈ 3.7 GB/s
// on this box while one core streams 13 GB/s; it is neither compute- nor bandwidth-bound (it packs
// the weight panel on every call). Here the weight is used in place, row-major (N, K) as nn.Linear
// stores it: no packed copy to keep in sync with an optimizer, LoRA or a checkpoint load.
//
// Shape of the computation: a tile is MB rows of x × NB rows of W, each output a dot product over K
// kept in its own 8-wide accumulator (4 × 3 = 12 of the 16 ymm registers; 3 W + 4 x loads feed 12
// FMAs). The NB weight rows (≤ 18 KB) stay in L1 while every row block of x passes over them, so
// each weight byte comes from memory once per call; the next tile's weight rows are prefetched while
// this tile computes, so memory and FMAs overlap. Every output element is summed in the same order
// whatever the number of rows or a row's place in the batch: results are batch-invariant.
//
// On a CPU with AVX-512 the same tiles run 16 floats wide (MB 4 × NB 4 accumulators of the 32 zmm
// registers), chosen at run time: MKL keeps to AVX2 on non-Intel CPUs, and on a Zen 5 core the wide
// kernel does 1.6–2× the AVX2 one's GFLOP/s at 16–128 rows. The two widths sum in different orders (each
// batch-invariant on its own); `set_vector_width` picks one for a test.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "vec.h"

#include <algorithm>
#include <vector>

namespace {

constexpr int kRowBlock = 4;   // MB: rows of x per tile
constexpr int kColBlock = 3;   // NB: rows of W (output columns) per tile

using r1kit_vec::hsum4;

struct Args {
  const float* x; const float* w; const float* bias; float* y;
  int64_t M, K, N;
  int64_t k_tail;   // K % 8, read with a masked load
  __m256i tail_mask;
};

// MB × NB outputs at (row 0 of x, row 0 of w); prefetch (nullable) = the next tile's weight rows
template <int MB, int NB>
inline void tile(const Args& a, const float* x, const float* w, float* y, const float* bias,
                 const float* prefetch) {
  const int64_t K = a.K;
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm256_loadu_ps(w + j * K + k);
    if (prefetch != nullptr && (k & 15) == 0)  // one 64-byte line per weight row every 16 floats
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * K + k), _MM_HINT_T0);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (a.k_tail) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm256_maskload_ps(w + j * K + k, a.tail_mask);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_maskload_ps(x + i * K + k, a.tail_mask);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  // the MB·NB dot products reduced four at a time (3 hsum4 for a 12-accumulator tile where 12 hsums took
  // 72 shuffles and adds: 1.00–1.06× at 16 rows, most where K is short); every output's lanes are summed in
  // the same order, so rows stay batch-invariant whatever tile they fall in
  constexpr int n = MB * NB, groups = (n + 3) / 4;
  const __m256* flat = &acc[0][0];
  const __m256 zero = _mm256_setzero_ps();
  alignas(16) float sums[groups * 4];
  for (int g = 0; g < groups; ++g) {
    const int i = 4 * g;
    _mm_store_ps(sums + i, hsum4(flat[i], i + 1 < n ? flat[i + 1] : zero, i + 2 < n ? flat[i + 2] : zero,
                                 i + 3 < n ? flat[i + 3] : zero));
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) y[i * a.N + j] = sums[i * NB + j] + (bias != nullptr ? bias[j] : 0.f);
}

// every row of x against NB weight rows starting at output column n
template <int NB>
void column(const Args& a, int64_t n, const float* prefetch) {
  const float* w = a.w + n * a.K;
  const float* bias = a.bias != nullptr ? a.bias + n : nullptr;
  int64_t m = 0;
  for (; m + kRowBlock <= a.M; m += kRowBlock) {
    // every row block prefetches the next tile again: measured 42 → 49 GFLOP/s at 16 rows over the
    // first block alone (a repeat of a line already in L1 costs next to nothing; one pass lets it slip)
    tile<kRowBlock, NB>(a, a.x + m * a.K, w, a.y + m * a.N + n, bias, prefetch);
  }
  const float* x = a.x + m * a.K;
  float* y = a.y + m * a.N + n;
  switch (a.M - m) {
    case 3: tile<3, NB>(a, x, w, y, bias, prefetch); break;
    case 2: tile<2, NB>(a, x, w, y, bias, prefetch); break;
    case 1: tile<1, NB>(a, x, w, y, bias, prefetch); break;
    default: break;
  }
}

}  // namespace


// -- the 16-wide kernel: compiled for AVX-512 only inside this region (everything torch's headers define
// lies above it, so no inline function of theirs is built for a CPU the process may not have) ------------
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace {
namespace wide {

constexpr int kRowBlock = 4;  // MB
constexpr int kColBlock = 4;  // NB: 16 accumulators + 4 W + 1 x of the 32 registers

template <int MB, int NB>
inline void tile(const Args& a, __mmask16 tail, const float* x, const float* w, float* y, const float* bias,
                 const float* prefetch) {
  const int64_t K = a.K;
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k);
    if (prefetch != nullptr)  // one 64-byte line per weight row every 16 floats
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * K + k), _MM_HINT_T0);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {  // the last K % 16 through masked loads (zeros past the row)
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(tail, w + j * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) y[i * a.N + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias != nullptr ? bias[j] : 0.f);
}

template <int NB>
void column(const Args& a, __mmask16 tail, int64_t n, const float* prefetch) {
  const float* w = a.w + n * a.K;
  const float* bias = a.bias != nullptr ? a.bias + n : nullptr;
  int64_t m = 0;
  for (; m + kRowBlock <= a.M; m += kRowBlock)
    tile<kRowBlock, NB>(a, tail, a.x + m * a.K, w, a.y + m * a.N + n, bias, prefetch);
  const float* x = a.x + m * a.K;
  float* y = a.y + m * a.N + n;
  switch (a.M - m) {
    case 3: tile<3, NB>(a, tail, x, w, y, bias, prefetch); break;
    case 2: tile<2, NB>(a, tail, x, w, y, bias, prefetch); break;
    case 1: tile<1, NB>(a, tail, x, w, y, bias, prefetch); break;
    default: break;
  }
}

// the column tiles lo..hi (kColBlock output columns each)
void columns(const Args& a, int64_t lo, int64_t hi) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (a.K % 16)) - 1u);
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t n = t * kColBlock;
    const int64_t width = std::min<int64_t>(kColBlock, a.N - n);
    const float* next = (t + 1 < hi && n + 2 * kColBlock <= a.N) ? a.w + (n + kColBlock) * a.K : nullptr;
    switch (width) {
      case 4: column<4>(a, tail, n, next); break;
      case 3: column<3>(a, tail, n, nullptr); break;
      case 2: column<2>(a, tail, n, nullptr); break;
      default: column<1>(a, tail, n, nullptr); break;
    }
  }
}

}  // namespace wide
}  // namespace
#pragma GCC pop_options

namespace {

// 512 where the CPU (and the OS) run AVX-512, else 256; set_vector_width narrows it (tests run both kernels)
int64_t g_width = __builtin_cpu_supports("avx512f") ? 512 : 256;

void narrow_columns(const Args& a, int64_t lo, int64_t hi) {  // the AVX2 kernel's column tiles lo..hi
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t n = t * kColBlock;
    const int64_t width = std::min<int64_t>(kColBlock, a.N - n);
    const float* next = (t + 1 < hi && n + 2 * kColBlock <= a.N) ? a.w + (n + kColBlock) * a.K : nullptr;
    if (width == 3) column<3>(a, n, next);
    else if (width == 2) column<2>(a, n, nullptr);
    else column<1>(a, n, nullptr);
  }
}

}  // namespace

int64_t vector_width() { return g_width; }

// 256 or 512 (the latter only where the CPU has AVX-512); returns the width now in use
int64_t set_vector_width(int64_t bits) {
  TORCH_CHECK(bits == 256 || bits == 512, "set_vector_width: 256 or 512, got ", bits);
  g_width = bits == 512 && __builtin_cpu_supports("avx512f") ? 512 : 256;
  return g_width;
}

// x (…, K) contiguous, weight (N, K), bias (N,) or None; all fp32, on the CPU → y (…, N): the leading axes
// are the rows (taken and given back here, so a decode step's call costs no reshape and view in Python)
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "skinny_linear: x (..., K) and weight (N, K) expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == at::kFloat &&
              weight.scalar_type() == at::kFloat, "skinny_linear: contiguous fp32 tensors expected");
  Args a{};
  a.K = x.size(-1); a.M = a.K > 0 ? x.numel() / a.K : 0; a.N = weight.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = a.N;
  auto y = torch::empty(shape, x.options());
  a.x = x.data_ptr<float>(); a.w = weight.data_ptr<float>(); a.y = y.data_ptr<float>();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == a.N && bias->scalar_type() == at::kFloat,
                "skinny_linear: bias (N,) fp32 expected");
    a.bias = bias->data_ptr<float>();
  }
  a.k_tail = a.K % 8;
  alignas(32) int32_t mask[8];
  for (int i = 0; i < 8; ++i) mask[i] = i < a.k_tail ? -1 : 0;
  a.tail_mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(mask));
  if (a.M == 0 || a.N == 0) return y;
  const bool is_wide = g_width == 512;
  const int64_t block = is_wide ? wide::kColBlock : kColBlock;
  const int64_t tiles = (a.N + block - 1) / block;
  at::parallel_for(0, tiles, 16, [&](int64_t lo, int64_t hi) {
    if (is_wide) wide::columns(a, lo, hi);
    else narrow_columns(a, lo, hi);
  });
  return y;
}
