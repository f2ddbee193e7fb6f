// Every decoder layer of a Llama-family model for one decode step, in one call (fp32, CPU).
//
// Why: at the batch sizes of GRPO rollouts on a CPU a decode step of a small model is mostly
// per-op cost — each of the ~15 torch ops of a layer costs 5–15 µs of Python and dispatch
// whatever its size, several times the matmuls' own time at 16 rows. Here the layer is plain
// loops (norms, RoPE, the KV write, residuals) around the same matmul and attention kernels the
// eager step uses, so the step costs about what its matmuls and its cache reads cost.
//
// The maths is models/llama.py's Block, written once more: RMSNorm → q, k, v (+ bias) → per-head
// q/k RMSNorm (Qwen3) → RoPE (half-split, the sign folded into sin) → write k, v at each row's
// position → softmax(q kᵀ·scale + mask) v → o (+ bias) → residual; RMSNorm → w2(silu(w1 h) · w3 h)
// → residual. tests/test_kernels.py checks it against that forward on every supported config.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                            const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& then);
c10::optional<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              const c10::optional<torch::Tensor>& mask, double scale,
                                              int64_t max_queries);
void rms_norm_rows(const float* x, float* y, const float* w, int64_t rows, int64_t n, float eps);  // rms_norm.cpp
void swiglu_rows(const float* a, const float* b, float* y, int64_t n);  // swiglu.cpp

namespace {

// the weights of one layer, in this order in the Python list (absent ones None)
enum Slot { kAttnNorm, kWq, kBq, kWk, kBk, kWv, kBv, kQNorm, kKNorm, kWo, kBo, kFfnNorm, kW1, kW2, kW3, kSlots };

using Weights = std::vector<c10::optional<torch::Tensor>>;

// x (B, heads·D) rotated in place: x_i·cos_i + x_{(i+D/2) mod D}·sin_i, cos/sin rows of length D per batch row;
// each pair (i, i + D/2) read once and both rotated, so no copy of the head and no modulo
void rope(float* x, const float* cos, const float* sin, int64_t cs_stride, int64_t B, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cos + b * cs_stride;
    const float* s = sin + b * cs_stride;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (b * heads + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float lo = v[i], hi = v[i + half];
        v[i] = lo * c[i] + hi * s[i];
        v[i + half] = hi * c[i + half] + lo * s[i + half];
      }
    }
  }
}

struct Step {  // what every layer of this step shares
  int64_t B, H, Hkv, D, Tk;
  double eps, scale;
  int64_t max_queries;
  bool onednn;  // the other matmuls by oneDNN (kernels.onednn_gemm), else at::linear (MKL)
  torch::Tensor cos, sin, pos, mask;
};

// oneDNN's matmul, the op kernels.onednn_gemm's path calls from Python (mkldnn::_linear_pointwise), boxed:
// its schema is torch's, so no C++ signature of it is written down here to drift
torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& W, const c10::optional<torch::Tensor>& b) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, W, b, std::string("none"), c10::List<c10::optional<c10::Scalar>>(), std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x @ W[slot]ᵀ (+ the bias slot): the skinny kernel where the slot has a packed weight (kernels.uses_kernel),
// prefetching `then`'s first panel (the packed weight of the matmul after this one, if any)
torch::Tensor project(const Step& st, const torch::Tensor& x, const Weights& w, const Weights& packed, int slot,
                      int bias, const c10::optional<torch::Tensor>& then) {
  const torch::Tensor& W = *w[slot];
  const c10::optional<torch::Tensor> b = bias < 0 ? c10::nullopt : w[bias];
  if (packed[slot].has_value()) return skinny_linear(x, *packed[slot], W.size(0), b, then);
  if (st.onednn) return onednn_linear(x, W, b);
  return b.has_value() ? at::linear(x, W, *b) : at::linear(x, W);
}

void add_into(torch::Tensor& x, const torch::Tensor& y) {  // x += y, both (B, d) contiguous
  float* a = x.data_ptr<float>();
  const float* b = y.data_ptr<float>();
  for (int64_t i = 0, n = x.numel(); i < n; ++i) a[i] += b[i];
}

// attention of layer l: write k, v (B, Hkv·D) at each row's position, attend q (B, H·D) → (B, H·D)
torch::Tensor attend(const Step& st, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     torch::Tensor& kc, torch::Tensor& vc) {
  const int64_t* pos = st.pos.data_ptr<int64_t>();
  for (auto [src, cache] : {std::pair{&k, &kc}, std::pair{&v, &vc}}) {
    const float* s = src->data_ptr<float>();
    float* c = cache->data_ptr<float>();
    const int64_t sb = cache->stride(0), sh = cache->stride(1), st_ = cache->stride(2);
    for (int64_t b = 0; b < st.B; ++b)
      for (int64_t h = 0; h < st.Hkv; ++h)
        std::copy_n(s + (b * st.Hkv + h) * st.D, st.D, c + b * sb + h * sh + pos[b] * st_);
  }
  auto q4 = q.view({st.B, 1, st.H, st.D}).transpose(1, 2);  // (B, H, 1, D)
  auto k4 = kc.narrow(2, 0, st.Tk), v4 = vc.narrow(2, 0, st.Tk);  // (B, Hkv, Tk, D)
  auto y = decode_attention(q4, k4, v4, st.mask, st.scale, st.max_queries);
  torch::Tensor out = y.has_value() ? *y
      : at::scaled_dot_product_attention(q4, k4, v4, st.mask, 0.0, false, st.scale, st.H != st.Hkv);
  return out.transpose(1, 2).reshape({st.B, st.H * st.D});  // (B, H, 1, D) → (B, H·D)
}

// after: the next layer's packed wq (its first matmul), or None
void layer(const Step& st, torch::Tensor& x, const Weights& w, const Weights& pk, torch::Tensor kc, torch::Tensor vc,
           const c10::optional<torch::Tensor>& after) {
  const int64_t d = x.size(1), D = st.D;
  auto h = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), h.data_ptr<float>(), w[kAttnNorm]->data_ptr<float>(), st.B, d, st.eps);
  auto q = project(st, h, w, pk, kWq, kBq, pk[kWk]).contiguous();
  auto k = project(st, h, w, pk, kWk, kBk, pk[kWv]).contiguous();
  auto v = project(st, h, w, pk, kWv, kBv, pk[kWo]).contiguous();
  if (w[kQNorm].has_value()) {  // Qwen3: each head normalised before it is rotated
    rms_norm_rows(q.data_ptr<float>(), q.data_ptr<float>(), w[kQNorm]->data_ptr<float>(), st.B * st.H, D, st.eps);
    rms_norm_rows(k.data_ptr<float>(), k.data_ptr<float>(), w[kKNorm]->data_ptr<float>(), st.B * st.Hkv, D, st.eps);
  }
  const int64_t cs = st.cos.stride(0);
  rope(q.data_ptr<float>(), st.cos.data_ptr<float>(), st.sin.data_ptr<float>(), cs, st.B, st.H, D);
  rope(k.data_ptr<float>(), st.cos.data_ptr<float>(), st.sin.data_ptr<float>(), cs, st.B, st.Hkv, D);
  auto y = attend(st, q, k, v, kc, vc).contiguous();
  add_into(x, project(st, y, w, pk, kWo, kBo, pk[kW1]).contiguous());
  rms_norm_rows(x.data_ptr<float>(), h.data_ptr<float>(), w[kFfnNorm]->data_ptr<float>(), st.B, d, st.eps);
  auto gate = project(st, h, w, pk, kW1, -1, pk[kW3]).contiguous();
  const auto up = project(st, h, w, pk, kW3, -1, pk[kW2]).contiguous();
  swiglu_rows(gate.data_ptr<float>(), up.data_ptr<float>(), gate.data_ptr<float>(), gate.numel());  // silu(gate)·up
  add_into(x, project(st, gate, w, pk, kW2, -1, after).contiguous());
}

}  // namespace

// x (B, 1, d) → x after every layer; k_cache, v_cache (L, B, Hkv, max_len, D) (the rows of this step),
// pos (B, 1) int64 positions written, cos, sin (B, 1, 1, D) views with contiguous rows, mask (B, 1, 1, Tk)
// additive float; weights: L × kSlots entries (see Slot); packed: the same list with kernels.WeightPacks' panels in
// the matmul slots the skinny kernel takes (None elsewhere); onednn: see Step.
torch::Tensor llama_decode_layers(const torch::Tensor& x_in, const std::vector<c10::optional<torch::Tensor>>& weights,
                                  const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& pos,
                                  const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& mask,
                                  int64_t n_heads, int64_t n_kv, double eps, double scale,
                                  const std::vector<c10::optional<torch::Tensor>>& packed, bool onednn,
                                  int64_t max_queries) {
  const int64_t L = k_cache.size(0), B = x_in.size(0), d = x_in.size(2), D = k_cache.size(4);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1 && x_in.scalar_type() == at::kFloat, "x must be (B, 1, d) fp32");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kSlots && packed.size() == weights.size(),
              "weights and packed must hold ", kSlots, " slots per layer");
  TORCH_CHECK(k_cache.size(1) == B && k_cache.size(2) == n_kv && k_cache.stride(4) == 1 && v_cache.sizes() == k_cache.sizes(),
              "caches must be (L, B, Hkv, max_len, D) with contiguous heads");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == B && pos.is_contiguous(), "pos must be (B, 1) int64");
  TORCH_CHECK(cos.numel() / cos.size(0) == D && cos.size(0) == B && cos.stride(3) == 1 && sin.strides() == cos.strides(),
              "cos/sin must be (B, 1, 1, D) with contiguous rows");
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == B && mask.scalar_type() == at::kFloat, "mask must be (B, 1, 1, Tk) float");
  Step st{B, n_heads, n_kv, D, mask.size(3), eps, scale, max_queries, onednn, cos, sin, pos, mask};
  auto x = x_in.reshape({B, d}).clone();  // (B, d): the residual stream, updated in place
  for (int64_t l = 0; l < L; ++l) {
    Weights w(weights.begin() + l * kSlots, weights.begin() + (l + 1) * kSlots);
    Weights pk(packed.begin() + l * kSlots, packed.begin() + (l + 1) * kSlots);
    const c10::optional<torch::Tensor> after = l + 1 < L ? packed[(l + 1) * kSlots + kWq] : c10::nullopt;
    layer(st, x, w, pk, k_cache[l], v_cache[l], after);
  }
  return x.view({B, 1, d});
}
