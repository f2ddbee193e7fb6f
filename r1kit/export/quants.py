"""GGUF quantization: per-tensor type rules of llama.cpp's mixes, and the quantizers.

Everything here mirrors what ``llama_model_quantize`` (llama.cpp as vendored by
llama-cpp-python 0.3.36) does without an importance matrix, so a file written by
:func:`quantize_gguf` holds the same tensor types and the same bytes:

* :func:`quantize` turns float rows into GGUF block bytes. Q4_K/Q5_K/Q6_K are ours
  (:mod:`r1kit.export.kquants`); Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/BF16 come from the ``gguf``
  package, whose quantizers were checked byte-identical to llama.cpp's reference ones.
* :func:`tensor_type` / :func:`plan_types` pick a tensor's type for a mix (Q4_K_M,
  Q5_K_M, Q6_K, Q8_0, ...): more bits for output / attn_v / ffn_down where llama.cpp
  gives them, F32 kept for norms and 1-D tensors, and llama.cpp's fallback when a row
  length is not a multiple of the block size.

Shapes are NumPy order throughout: the last axis is the row (GGUF's ``ne[0]``).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFReader, GGUFValueType, GGUFWriter
from gguf import LlamaFileType as FT
from gguf import quants as gguf_quants

from r1kit.export.kquants import quantize_k

__all__ = ["MIXES", "ArchInfo", "quantize", "tensor_type", "plan_types", "allows_quantization",
           "quantize_gguf"]


@dataclass(frozen=True)
class Mix:
    name: str
    ftype: FT  # written to general.file_type
    default: QT  # type of an ordinary weight matrix


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("F32", FT.ALL_F32, QT.F32), Mix("F16", FT.MOSTLY_F16, QT.F16),
    Mix("BF16", FT.MOSTLY_BF16, QT.BF16), Mix("Q8_0", FT.MOSTLY_Q8_0, QT.Q8_0),
    Mix("Q4_0", FT.MOSTLY_Q4_0, QT.Q4_0), Mix("Q4_1", FT.MOSTLY_Q4_1, QT.Q4_1),
    Mix("Q5_0", FT.MOSTLY_Q5_0, QT.Q5_0), Mix("Q5_1", FT.MOSTLY_Q5_1, QT.Q5_1),
    Mix("Q4_K_S", FT.MOSTLY_Q4_K_S, QT.Q4_K), Mix("Q4_K_M", FT.MOSTLY_Q4_K_M, QT.Q4_K),
    Mix("Q5_K_S", FT.MOSTLY_Q5_K_S, QT.Q5_K), Mix("Q5_K_M", FT.MOSTLY_Q5_K_M, QT.Q5_K),
    Mix("Q6_K", FT.MOSTLY_Q6_K, QT.Q6_K),
)}

_FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
_GGUF_QUANTIZERS = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16)
_OURS = (QT.Q4_K, QT.Q5_K, QT.Q6_K)
SUPPORTED_TYPES = (QT.F32, QT.F16) + _GGUF_QUANTIZERS + _OURS


def get_mix(mix: str | Mix) -> Mix:
    if isinstance(mix, Mix):
        return mix
    try:
        return MIXES[mix.upper()]
    except KeyError:
        raise ValueError(f"unknown quantization mix {mix!r}; choose one of {', '.join(MIXES)}") from None


def _as_qtype(qtype: QT | str) -> QT:
    if isinstance(qtype, str):
        try:
            return QT[qtype.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML type {qtype!r}") from None
    return QT(qtype)


# ---------------------------------------------------------------------------------------------
# quantizers
# ---------------------------------------------------------------------------------------------

def quantize(data: np.ndarray, qtype: QT | str) -> np.ndarray:
    """Float values of shape (..., n) -> uint8 (..., row_bytes): GGUF's row layout for `qtype`."""
    qtype = _as_qtype(qtype)
    data = np.asarray(data)
    if data.ndim == 0:
        raise ValueError("quantize needs at least one dimension")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block}, got {data.shape[-1]}")
    out_shape = (*data.shape[:-1], data.shape[-1] // block * type_size)
    x = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QT.F32:
        out = x.view(np.uint8)
    elif qtype == QT.F16:
        out = x.astype(np.float16).view(np.uint8)
    elif qtype in _GGUF_QUANTIZERS:
        out = np.asarray(gguf_quants.quantize(x, qtype))
    elif qtype in _OURS:
        out = quantize_k(x, qtype.name)
    else:
        raise ValueError(f"quantizing to {qtype.name} is not supported "
                         f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
    return out.reshape(out_shape)


# ---------------------------------------------------------------------------------------------
# model facts the rules depend on
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchInfo:
    """What llama.cpp's type rules read from the model's metadata.

    n_layer is ``{arch}.block_count`` (llama.cpp's ``n_layer_all``, MTP layers included);
    tied_embeddings means the file has no ``output.weight``, so token_embd doubles as the output
    projection and is quantized like it. n_attn_v is how many attn_v-like tensors (attn_v,
    attn_qkv, attn_kv_b) the model has; None means one per layer.
    """
    arch: str = "llama"
    n_layer: int = 1
    n_expert: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    tied_embeddings: bool = False
    n_attn_v: int | None = None

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B: it bumps attn_v; only layer count (and GQA for llama) decide it
        if self.arch == "llama":
            return self.n_layer == 80 and self.n_head != self.n_head_kv
        return self.arch == "qwen2" and self.n_layer == 80

    @classmethod
    def from_reader(cls, reader: GGUFReader) -> "ArchInfo":
        fields = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        arch = _text(fields.get("general.architecture", b"llama"))

        def num(key: str, default: int = 0) -> int:
            v = fields.get(f"{arch}.{key}", default)
            return int(v[0] if isinstance(v, list) else v)  # per-layer arrays: llama.cpp reads layer 0

        names = [t.name for t in reader.tensors]
        return cls(arch=arch, n_layer=num("block_count", 1), n_expert=num("expert_count"),
                   n_head=num("attention.head_count"), n_head_kv=num("attention.head_count_kv"),
                   tied_embeddings="output.weight" not in names,
                   n_attn_v=sum(_category(n) in _ATTN_V_LIKE for n in names))


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)
