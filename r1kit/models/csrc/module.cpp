// The Python module of r1kit's CPU decode kernels (r1kit/models/kernels.py builds and loads it).
#include <torch/extension.h>

torch::Tensor pack_weight(const torch::Tensor& weight);
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                            const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& then);
int64_t vector_width();
int64_t set_vector_width(int64_t bits);
bool decode_attention_applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const c10::optional<torch::Tensor>& mask, int64_t max_queries);
c10::optional<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              const c10::optional<torch::Tensor>& mask, double scale,
                                              int64_t max_queries);
torch::Tensor llama_decode_layers(const torch::Tensor& x_in, const std::vector<c10::optional<torch::Tensor>>& weights,
                                  const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& pos,
                                  const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& mask,
                                  int64_t n_heads, int64_t n_kv, double eps, double scale,
                                  const std::vector<c10::optional<torch::Tensor>>& packed, bool onednn,
                                  int64_t max_queries);

std::vector<torch::Tensor> sample_untruncated(const torch::Tensor& logits, const torch::Tensor& temperature,
                                              const torch::Tensor& top_p, const torch::Tensor& top_k,
                                              const torch::Tensor& u);
torch::Tensor swiglu_forward(const torch::Tensor& a, const torch::Tensor& b);
std::vector<torch::Tensor> swiglu_backward(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& g);
torch::Tensor rms_norm_forward(const torch::Tensor& x, const torch::Tensor& w, double eps);
std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& dy,
                                             double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "W (N, K) -> the skinny kernel's (P, K, 48 | 16) column panels (fp32)");
  m.def("skinny_linear", &skinny_linear, "y = x W^T (+ b) for few rows, from pack_weight(W) and N (fp32); then: the "
        "next matmul's panels, prefetched", py::arg("x"), py::arg("packed"), py::arg("N"), py::arg("bias") = py::none(),
        py::arg("then") = py::none());
  m.def("vector_width", &vector_width, "the skinny kernel's vector width in bits: 512 (AVX-512) or 256 (AVX2)");
  m.def("set_vector_width", &set_vector_width, "use the 256- or 512-bit skinny kernel (512 only with AVX-512)");
  m.def("decode_attention_applies", &decode_attention_applies, "whether decode_attention takes these inputs");
  m.def("decode_attention", &decode_attention,
        "softmax(q k^T scale + mask) v for few queries (fp32, AVX2 + FMA); None outside its contract");
  m.def("rms_norm_forward", &rms_norm_forward, "y = x / sqrt(mean(x^2) + eps) * w over rows (fp32)");
  m.def("rms_norm_backward", &rms_norm_backward, "(dx, dw) of rms_norm_forward (fp32)");
  m.def("sample_untruncated", &sample_untruncated,
        "one inverse-CDF draw per row of the tempered distribution, greedy at temperature 0 (fp32); "
        "nothing when a sampled row is truncated");
  m.def("swiglu_forward", &swiglu_forward, "silu(a) * b (fp32)");
  m.def("swiglu_backward", &swiglu_backward, "(da, db) of swiglu_forward (fp32)");
  m.def("llama_decode_layers", &llama_decode_layers, "every decoder layer of a Llama-family decode step (fp32)");
}
