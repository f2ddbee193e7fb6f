"""GGUF quantization: per-tensor type rules of llama.cpp's mixes, and the quantizers.

Everything here mirrors what ``llama_model_quantize`` (llama.cpp as vendored by
llama-cpp-python 0.3.36) does without an importance matrix, so a file written by
:func:`quantize_gguf` holds the same tensor types and the same bytes:

* :func:`quantize` turns float rows into GGUF block bytes. Q4_K/Q5_K/Q6_K are ours
  (:mod:`r1kit.formats.kquants`), and so are the 32-value Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
  (:mod:`r1kit.formats.legacy_quants`, 2–3× faster than the ``gguf`` package's NumPy ones,
  which they are tested against byte for byte); BF16 comes from ``gguf``.
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
from r1kit.common import require, umask_mode
require("gguf", "GGUF quantization")  # one line naming the extra when it is missing
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType
from gguf import LlamaFileType as FT
from gguf import quants as gguf_quants

from r1kit.formats.gguf_file import DEFAULT_ALIGNMENT, GGUFHeader, TensorInfo, Value, encode_header, write_tensor
from r1kit.formats.kquants import quantize_k
from r1kit.formats.legacy_quants import quantize_legacy

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
_LEGACY = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
_GGUF_QUANTIZERS = (QT.BF16,)
_OURS = (QT.Q4_K, QT.Q5_K, QT.Q6_K)
SUPPORTED_TYPES = (QT.F32, QT.F16) + _LEGACY + _GGUF_QUANTIZERS + _OURS


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
    if not np.isfinite(x).all():  # llama.cpp rejects the result of such rows; fail up front
        raise ValueError("values contain NaN or Inf")
    if qtype == QT.F32:
        out = x.view(np.uint8)
    elif qtype == QT.F16:
        out = x.astype(np.float16).view(np.uint8)
    elif qtype in _LEGACY:
        out = quantize_legacy(x, qtype.name)
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
    def from_header(cls, header: GGUFHeader) -> "ArchInfo":
        arch = header.architecture or "llama"

        def num(key: str, default: int = 0) -> int:
            v = header.value(f"{arch}.{key}")
            if v is None:
                return default
            return int(v[0] if isinstance(v, np.ndarray) else v)  # per-layer arrays: llama.cpp reads layer 0

        names = [t.name for t in header.tensors]
        return cls(arch=arch, n_layer=num("block_count", 1), n_expert=num("expert_count"),
                   n_head=num("attention.head_count"), n_head_kv=num("attention.head_count_kv"),
                   tied_embeddings="output.weight" not in names,
                   n_attn_v=sum(_category(n) in _ATTN_V_LIKE for n in names))


# ---------------------------------------------------------------------------------------------
# per-tensor rules (llama.cpp src/llama-quant.cpp, no imatrix, no user overrides)
# ---------------------------------------------------------------------------------------------

# substrings that keep a weight in its source type whatever the mix (tiny or index-like tensors)
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    *(f"time_mix_{s}.weight" for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2",
                                       "g1", "g2", "decay_w1", "decay_w2", "lerp_fused")),
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")

# category by name, first match wins; the order matters ("attn_kv_b" before "attn_v" ...)
_CATEGORY_PATTERNS = (
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")
_LAYER_RE = re.compile(r"blk\.\s*([+-]?\d+)")


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for pattern, cat in _CATEGORY_PATTERNS:
        if pattern in name:
            return cat
    return "other"


def _trimmed(shape: Sequence[int]) -> tuple[int, ...]:
    """Drop leading size-1 axes, as ggml_n_dims ignores trailing ne[] of 1."""
    shape = tuple(int(s) for s in shape)
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return shape[i:]


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """Whether llama.cpp would convert this tensor at all (else it keeps its source type)."""
    if len(_trimmed(shape)) < 2 or not name.endswith("weight"):
        return False
    return name not in _KEEP_NAMES and not any(s in name for s in _KEEP_SUBSTRINGS)


def _layer_of(name: str) -> int:
    m = _LAYER_RE.match(name)
    if m is None:
        raise ValueError(f"cannot tell the layer of tensor {name!r} (expected a 'blk.N.' prefix)")
    return int(m.group(1))


def _use_more_bits(i: int, n: int) -> bool:
    # C integer division; the modulo is only reached with i >= n//8, so signs agree with C
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _output_rule(ne0: int, mix: Mix, info: ArchInfo) -> QT:
    if info.arch == "falcon" or ne0 % GGML_QUANT_SIZES[mix.default][0]:
        return QT.Q8_0
    return mix.default if mix.default == QT.Q8_0 else QT.Q6_K


def _attn_v_rule(new: QT, mix: Mix, info: ArchInfo, i_attn_v: int, n_attn_v: int) -> QT:
    if mix.name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attn_v, n_attn_v):
        new = QT.Q6_K
    elif mix.name == "Q4_K_S" and i_attn_v < 4:
        new = QT.Q5_K
    if info.is_70b and new in (QT.Q3_K, QT.Q4_K):
        new = QT.Q5_K  # 70B shares each attn_v across 8 heads: a cheap place for more bits
    return QT.Q8_0 if info.n_expert == 8 else new


def _ffn_down_rule(new: QT, mix: Mix, info: ArchInfo, i_layer: int, n_layer: int) -> QT:
    falcon = info.arch == "falcon"
    if mix.name == "Q4_K_M":
        if falcon:
            if i_layer < n_layer // 16:
                return QT.Q6_K
            return QT.Q5_K if _use_more_bits(i_layer, n_layer) else QT.Q4_K
        return QT.Q6_K if _use_more_bits(i_layer, n_layer) else new
    if mix.name == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
        return QT.Q6_K
    if mix.name == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
        return QT.Q5_K
    return new


def _mix_rule(name: str, cat: str, ne0: int, mix: Mix, info: ArchInfo,
              i_attn_v: int, n_attn_v: int, i_ffn_down: int) -> QT:
    """llama_tensor_get_type_impl restricted to the mixes in MIXES."""
    new = mix.default
    if cat == "output" or (info.tied_embeddings and cat == "token_embd"):
        return _output_rule(ne0, mix, info)
    if cat in _ATTN_V_LIKE:
        return _attn_v_rule(new, mix, info, i_attn_v, n_attn_v)
    if cat == "attn_k":
        return QT.Q8_0 if info.n_expert == 8 else new
    if cat == "ffn_down":
        if info.n_expert > 1:  # experts are not stored in layer order: read the layer off the name
            i_layer = _layer_of(name)
            if not 0 <= i_layer < info.n_layer:
                raise ValueError(f"tensor {name!r}: layer {i_layer} outside [0, {info.n_layer})")
        else:
            i_layer = i_ffn_down
        return _ffn_down_rule(new, mix, info, i_layer, info.n_layer)
    if cat == "attn_output" and info.arch != "falcon" and info.n_expert == 8 \
            and mix.name in ("Q4_K_S", "Q4_K_M"):
        return QT.Q5_K
    if cat == "attn_qkv":
        return {"Q4_K_M": QT.Q5_K, "Q5_K_M": QT.Q6_K}.get(mix.name, new)
    return new


_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _fallback(name: str, ne0: int, qtype: QT) -> QT:
    """A 256-block type on rows it does not divide drops to a 32-block type, then to F16."""
    block = GGML_QUANT_SIZES[qtype][0]
    if ne0 % block == 0:
        return qtype
    if block > 32 and qtype not in _FALLBACK:
        raise ValueError(f"tensor {name!r}: no fallback for {qtype.name} with rows of {ne0}")
    new = _FALLBACK.get(qtype, qtype)
    return new if ne0 % GGML_QUANT_SIZES[new][0] == 0 else QT.F16


def _choose(name: str, shape: Sequence[int], src: QT, mix: Mix, info: ArchInfo,
            i_attn_v: int, n_attn_v: int, i_ffn_down: int) -> QT:
    shape = _trimmed(shape)
    if not allows_quantization(name, shape):
        return src
    if mix.default in _FLOAT_TYPES:  # float "mixes" skip every rule and every fallback
        return mix.default
    cat = _category(name)
    new = _mix_rule(name, cat, shape[-1], mix, info, i_attn_v, n_attn_v, i_ffn_down)
    return _fallback(name, shape[-1], new)


def tensor_type(name: str, shape: Sequence[int], mix: str | Mix, info: ArchInfo,
                src_type: QT = QT.F32) -> QT:
    """The type llama.cpp gives tensor `name` (NumPy `shape`) in `mix`.

    llama.cpp counts attn_v and dense ffn_down tensors as it meets them; for a model with one
    per layer that count is the layer index, which is what this single-tensor form assumes.
    :func:`plan_types` replays llama.cpp's counting over a whole model instead.
    """
    mix = get_mix(mix)
    cat = _category(name)
    i = _layer_of(name) if cat in _ATTN_V_LIKE or (cat == "ffn_down" and info.n_expert <= 1) else 0
    n_attn_v = info.n_attn_v if info.n_attn_v is not None else info.n_layer
    return _choose(name, shape, src_type, mix, info, i, n_attn_v, i)


def llama_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order: by layer number (none first), then by name."""
    def key(n: str):
        m = _LAYER_RE.match(n)
        return (int(m.group(1)) if m else -1, n.encode("utf-8"))
    return sorted(names, key=key)


def plan_types(tensors: Iterable[tuple[str, Sequence[int], QT]], mix: str | Mix,
               info: ArchInfo) -> dict[str, QT]:
    """{name: type} for (name, NumPy shape, source type) triples, in llama.cpp's order, with its
    running attn_v / ffn_down counters."""
    mix = get_mix(mix)
    by_name = {name: (shape, QT(src)) for name, shape, src in tensors}
    n_attn_v = sum(_category(n) in _ATTN_V_LIKE for n in by_name)
    plan: dict[str, QT] = {}
    i_attn_v = i_ffn_down = 0
    for name in llama_order(by_name):
        shape, src = by_name[name]
        plan[name] = _choose(name, shape, src, mix, info, i_attn_v, n_attn_v, i_ffn_down)
        if allows_quantization(name, shape) and mix.default not in _FLOAT_TYPES:
            cat = _category(name)
            i_attn_v += cat in _ATTN_V_LIKE
            i_ffn_down += cat == "ffn_down"
    return plan


# ---------------------------------------------------------------------------------------------
# whole files
# ---------------------------------------------------------------------------------------------

_DROPPED_KEYS = ("general.architecture",  # written first, from the source architecture
                 "general.quantization_version", "general.file_type",  # re-added last, like llama.cpp
                 "split.no", "split.count", "split.tensors.count")


def _output_fields(header: GGUFHeader, arch: str, mix: Mix) -> dict[str, Value]:
    """The source's metadata as llama.cpp's quantizer writes it: architecture first, keys in source
    order (split and file-type keys dropped), then the quantization version and the new file type."""
    fields = {"general.architecture": Value(arch, GGUFValueType.STRING)}
    for name, v in header.fields.items():
        if name.startswith("GGUF.") or name in _DROPPED_KEYS:
            continue
        if v.type == GGUFValueType.ARRAY and (v.sub_type == GGUFValueType.ARRAY or not len(v.value)):
            raise ValueError(f"metadata {name!r}: nested or empty arrays cannot be written")
        fields[name] = v
    fields["general.quantization_version"] = Value(2, GGUFValueType.UINT32)  # ggml's GGML_QNT_VERSION
    fields["general.file_type"] = Value(int(mix.ftype), GGUFValueType.UINT32)
    return fields


def _source_f32(header: GGUFHeader, tensor: TensorInfo) -> np.ndarray:
    """A tensor as float32 in NumPy shape, for F32 / F16 / BF16 sources."""
    src, raw = QT(tensor.ggml_type), header.data(tensor)
    if src == QT.F32:
        return raw.view(np.float32).reshape(tensor.shape)
    if src == QT.F16:
        return raw.view(np.float16).reshape(tensor.shape).astype(np.float32)
    if src == QT.BF16:
        bits = raw.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tensor.shape)
    raise ValueError(f"cannot requantize from {src.name}; start from an F32, F16 or BF16 file")


def _n_bytes(shape: tuple[int, ...], qtype: QT) -> int:
    return int(np.prod(_row_bytes(shape, qtype)))


def _row_bytes(shape: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * type_size)


def _tensor_bytes(header: GGUFHeader, tensor: TensorInfo, shape: tuple[int, ...], target: QT) -> np.ndarray:
    if QT(tensor.ggml_type) == target:  # unchanged tensors are copied byte for byte
        return header.data(tensor).reshape(_row_bytes(shape, target))
    try:
        return quantize(_source_f32(header, tensor).reshape(shape), target)
    except ValueError as e:
        raise ValueError(f"tensor {tensor.name!r}: {e}") from e


def quantize_gguf(in_path: str | os.PathLike, out_path: str | os.PathLike, mix: str | Mix) -> dict[str, QT]:
    """Quantize an F32/F16/BF16 GGUF file into `mix`, as llama.cpp's quantizer would.

    Metadata is copied (general.file_type and general.quantization_version set like llama.cpp
    sets them), tensors are written in llama.cpp's order, and the file appears atomically
    (temp file in the same folder, then rename). Returns {tensor name: type written}.
    """
    mix = get_mix(mix)
    header = GGUFHeader(in_path)
    info = ArchInfo.from_header(header)
    tensors = {t.name: t for t in header.tensors}
    shapes = {n: _trimmed(t.shape) for n, t in tensors.items()}
    plan = plan_types(((n, shapes[n], QT(t.ggml_type)) for n, t in tensors.items()), mix, info)

    fields = _output_fields(header, info.arch, mix)
    align = int(header.value("general.alignment", DEFAULT_ALIGNMENT))
    infos = [(name, shapes[name], int(qtype), _n_bytes(shapes[name], qtype)) for name, qtype in plan.items()]
    out_path = os.fspath(out_path)
    fd, tmp = tempfile.mkstemp(prefix=".quant-", suffix=".gguf", dir=os.path.dirname(os.path.abspath(out_path)))
    os.chmod(tmp, umask_mode())  # mkstemp's 0600 would survive the rename
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_header(fields, infos, align))
            for name, qtype in plan.items():
                write_tensor(f, _tensor_bytes(header, tensors[name], shapes[name], qtype), align)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return plan
