"""Attention with explicit masks on CPU: SDPA against hand-written matmuls, for the shapes r1kit runs.

Why the models use the paths they do (one thread, process CPU time, fastest of interleaved repeats):
  1. dense decode (one query per row over [:Tk] views of a longer KV cache, GQA, float mask): SDPA vs
     grouped matmuls (the hand-written decode path the dense model used to have) vs r1kit's decode
     attention kernel (models/kernels.py, what the engine runs), at three shapes: the bench's GQA one,
     the GRPO race's (128 rows × 4 heads × 32 dims) and SmolLM2-135M's (16 rows × 9 / 3 heads × 64)
  2. packed training (forward + backward, B×H×T×T block-diagonal mask) vs plain causal SDPA: what
     document packing's explicit mask costs
  3. MLA's absorbed attention (one latent "head" with T·H query rows, value = c_kv): SDPA with the
     mask vs deepseek.latent_attention's matmuls, prefill and decode

    python bench/attention.py
Ends with: dense_decode_sdpa_over_matmul=<x> dense_decode_kernel_over_sdpa=<worst of the three shapes>
packed_mask_over_causal=<x> latent_prefill_sdpa_over_matmul=<x> latent_decode_sdpa_over_matmul=<x>
(ratios of times: < 1 means the first named, or the mask, is the cheaper one)
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from r1kit.models import kernels
from r1kit.models.deepseek import latent_attention
from r1kit.models.llama import document_mask


def best(fns: dict, repeats: int = 5, inner: int = 20) -> dict:
    """Fastest process-time per call of each function, repeats interleaved across them."""
    out = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.process_time()
            for _ in range(inner):
                f()
            out[k] = min(out[k], (time.process_time() - t) / inner)
    return out


def grouped_matmul_decode(q, k, v, mask):
    """The peer: GQA decode as matmuls over query heads stacked per KV head."""
    B, H, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    s = torch.matmul(q.reshape(B, Hkv, (H // Hkv) * T, D), k.transpose(-1, -2)) * D ** -0.5
    s = s.view(B, Hkv, H // Hkv, T, Tk).masked_fill(~mask[:, :, None], float("-inf"))
    return torch.matmul(s.softmax(-1).view(B, Hkv, -1, Tk), v).view(B, H, T, D)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ratios = {}
    # 1. dense decode: the cache is (B, Hkv, max_len, D) and a step reads its [:Tk] view, rows masked off past
    # their own length (ragged prompts)
    kernel_ratio = []
    for B, H, Hkv, Tk, D in ((16, 8, 4, 160, 64), (128, 4, 4, 60, 32), (16, 9, 3, 200, 64)):
        q = torch.randn(B, H, 1, D, generator=g)
        k, v = (torch.randn(B, Hkv, 2 * Tk, D, generator=g)[:, :, :Tk] for _ in range(2))
        mask = torch.arange(Tk)[None, None, None] < torch.randint(Tk // 4, Tk, (B, 1, 1, 1), generator=g)
        fmask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))  # the float mask the models build

        def kernel():
            with torch.no_grad(), kernels.decode_kernels():
                return kernels.attention(q, k, v, fmask)
        t = best({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=fmask, enable_gqa=H != Hkv),
                  "matmul": lambda: grouped_matmul_decode(q, k, v, mask), "kernel": kernel})
        print(f"dense decode  B{B} H{H}/{Hkv} Tk{Tk} D{D}: sdpa {t['sdpa'] * 1e6:.0f} µs, matmuls {t['matmul'] * 1e6:.0f} µs, "
              f"r1kit kernel {t['kernel'] * 1e6:.0f} µs" + ("" if kernels._module() else " (not built: SDPA)"))
        ratios.setdefault("dense_decode_sdpa_over_matmul", t["sdpa"] / t["matmul"])  # the first shape, as before
        kernel_ratio.append(t["kernel"] / t["sdpa"])
    ratios["dense_decode_kernel_over_sdpa"] = max(kernel_ratio)
    # 2. packed training: 8 rows of 256 tokens, 4 heads of 32, documents of 20-80 tokens
    B, H, T, D = 8, 4, 256, 32
    doc = torch.cumsum(torch.rand(B, T, generator=g) < 1 / 50, dim=1)
    m = document_mask(doc)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    t = best({"mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum().backward(),
              "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()}, inner=5)
    print(f"packed train  B{B} H{H} T{T}: document mask {t['mask'] * 1e3:.1f} ms, causal {t['causal'] * 1e3:.1f} ms")
    ratios["packed_mask_over_causal"] = t["mask"] / t["causal"]
    # 3. MLA absorbed: latent rank 64 + rope 16, 4 heads; prefill T 256 and decode over 300 cached
    r, rope, H = 64, 16, 4
    for name, B, T, Tk in (("prefill", 4, 256, 256), ("decode", 16, 1, 300)):
        qa, lat = torch.randn(B, T * H, r + rope, generator=g), torch.randn(B, Tk, r + rope, generator=g)
        base = torch.ones(T, Tk, dtype=torch.bool).tril(Tk - T)  # (T, Tk) causal
        ma = base[:, None].expand(T, H, Tk).reshape(1, T * H, Tk).expand(B, -1, -1)
        t = best({"sdpa": lambda: F.scaled_dot_product_attention(qa, lat, lat[..., :r], attn_mask=ma, scale=0.1),
                  "matmul": lambda: latent_attention(qa, lat, lat[..., :r], ma, 0.1)}, inner=5 if T > 1 else 20)
        print(f"MLA absorbed {name} B{B} T{T} Tk{Tk}: sdpa {t['sdpa'] * 1e3:.2f} ms, matmuls {t['matmul'] * 1e3:.2f} ms")
        ratios[f"latent_{name}_sdpa_over_matmul"] = t["sdpa"] / t["matmul"]
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
