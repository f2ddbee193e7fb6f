"""GGUF files, fast: the header read in one pass (tensor data memory-mapped), and written back.

`gguf.GGUFReader` builds a NumPy memmap view for every part of every field; a 49k-token
vocabulary with its merges is ~150k such views and takes several seconds (7.6 s for
SmolLM2-135M's header here) — longer than llama.cpp needs to quantize the whole model. This reads
the same header with `struct` over one bytes buffer (≈ 0.1 s), keeps each value's GGUF type so
a writer can copy it back unchanged, and hands out tensor data as NumPy views of one memmap, so
asking for the header alone never touches tensor data. Writing mirrors it: `encode_header`
produces the bytes `gguf.GGUFWriter` would for the same fields and tensors (whose per-element
packing of a 100k-string vocabulary costs over a second), with arrays encoded in bulk.

Layout (GGUF v2/v3, either byte order): magic "GGUF", version u32, n_tensors u64, n_kv u64;
n_kv × (key string, type u32, value); n_tensors × (name string, n_dims u32, dims u64 × n_dims
(fastest first), type u32, offset u64); tensor data from the next multiple of
`general.alignment` (default 32). A string is a u64 length and UTF-8 bytes; an array is an
element type u32, a count u64 and the elements.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types → (struct code, NumPy dtype) for fixed-size scalars
_SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
            5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64),
            11: ("q", np.int64), 12: ("d", np.float64)}
STRING, ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """The file is not a readable GGUF; the message names the file and where it broke."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order (slowest first), as gguf.GGUFReader's `data` has it
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class Value:
    value: object  # int / float / bool / str, or a list (strings) / NumPy array (numbers)
    type: int  # GGUF value type
    sub_type: int | None = None  # element type of an array


class GGUFHeader:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self._buf = self.path.read_bytes() if self.path.stat().st_size < (64 << 20) else None
        except OSError as e:
            raise GGUFHeaderError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self._buf is None else None
        self.file_size = self.path.stat().st_size
        self.fields: dict[str, Value] = {}
        self.tensors: list[TensorInfo] = []
        self._parse()

    # -- parsing -------------------------------------------------------------------------------
    def _bytes(self, n_max: int) -> memoryview:
        if self._buf is not None:
            return memoryview(self._buf)
        return memoryview(self._map[:n_max])  # the header of a large file: grow on demand

    def _parse(self) -> None:
        size, window = self.file_size, 1 << 20
        if bytes(self._bytes(4)[:4]) != MAGIC:
            raise GGUFHeaderError(f"{self.path}: not a GGUF file (no 'GGUF' magic)")
        while True:  # headers of big vocabularies run to several MiB: widen the window until it fits
            self._mv = self._bytes(min(size, window))
            try:
                end = self._parse_window()
                break
            except _Short:
                if window >= size:
                    raise GGUFHeaderError(f"{self.path}: truncated GGUF header ({self._where})") from None
                window *= 4
        align = int(self.value("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            raise GGUFHeaderError(f"{self.path}: general.alignment = {align} is not a power of two")
        self.data_offset = -(-end // align) * align
        for t in self.tensors:
            t.offset += self.data_offset
            if t.offset + t.n_bytes > size:
                raise GGUFHeaderError(f"{self.path}: tensor {t.name!r} runs past the end of the file "
                                      f"(needs {t.offset + t.n_bytes} bytes, the file has {size}): truncated?")

    def _parse_window(self) -> int:
        self._pos, self._where = 0, "magic"
        if bytes(self._take(4)) != MAGIC:
            raise GGUFHeaderError(f"{self.path}: not a GGUF file (no 'GGUF' magic)")
        self._end = "<"
        version = self._scalar("I")
        if version & 0xFFFF == 0:  # a big-endian file read as little-endian
            self._end, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise GGUFHeaderError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        self.version = version
        n_tensors, n_kv = self._scalar("Q"), self._scalar("Q")
        self.fields = {}
        for _ in range(n_kv):
            self._where = "metadata key"
            key = self._string()
            self._where = f"metadata {key!r}"
            vtype = self._scalar("I")
            self.fields[key] = self._value(vtype)
        self.tensors = []
        for _ in range(n_tensors):
            self._where = "tensor info"
            self.tensors.append(self._tensor_info())
        return self._pos

    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._mv):
            raise _Short
        out = self._mv[self._pos:self._pos + n]
        self._pos += n
        return out

    def _scalar(self, code: str):
        n = struct.calcsize(code)
        return struct.unpack(self._end + code, self._take(n))[0]

    def _string(self) -> str:
        n = self._scalar("Q")
        raw = bytes(self._take(n))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFHeaderError(f"{self.path}: invalid UTF-8 in {self._where}") from None

    def _value(self, vtype: int) -> Value:
        if vtype in _SCALARS:
            v = self._scalar(_SCALARS[vtype][0])
            return Value(bool(v) if vtype == 7 else v, vtype)
        if vtype == STRING:
            return Value(self._string(), vtype)
        if vtype != ARRAY:
            raise GGUFHeaderError(f"{self.path}: unknown value type {vtype} in {self._where}")
        sub, count = self._scalar("I"), self._scalar("Q")
        if sub in _SCALARS:
            dt = np.dtype(_SCALARS[sub][1]).newbyteorder(self._end)
            arr = np.frombuffer(self._take(count * dt.itemsize), dtype=dt).astype(dt.newbyteorder("="))
            return Value(arr, ARRAY, sub)
        if sub == STRING:
            return Value(self._string_array(count), ARRAY, sub)
        if sub == ARRAY:
            return Value([self._value(ARRAY).value for _ in range(count)], ARRAY, sub)
        raise GGUFHeaderError(f"{self.path}: unknown array element type {sub} in {self._where}")

    def _string_array(self, count: int) -> list[str]:
        mv, pos, out, q = self._mv, self._pos, [], struct.Struct(self._end + "Q")
        for _ in range(count):
            if pos + 8 > len(mv):
                raise _Short
            (n,) = q.unpack_from(mv, pos)
            pos += 8
            if pos + n > len(mv):
                raise _Short
            out.append(bytes(mv[pos:pos + n]).decode("utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out

    def _tensor_info(self) -> TensorInfo:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
        name = self._string()
        self._where = f"tensor info {name!r}"
        dims = [self._scalar("Q") for _ in range(self._scalar("I"))]
        gtype, offset = self._scalar("I"), self._scalar("Q")
        try:
            block, size = GGML_QUANT_SIZES[QT(gtype)]
        except (ValueError, KeyError):
            raise GGUFHeaderError(f"{self.path}: tensor {name!r} has unknown type {gtype}") from None
        n = 1
        for d in dims:
            n *= d
        if dims and dims[0] % block:
            raise GGUFHeaderError(f"{self.path}: tensor {name!r}: rows of {dims[0]} do not divide into "
                                  f"{QT(gtype).name} blocks of {block}")
        return TensorInfo(name, tuple(reversed(dims)), gtype, offset, n // block * size)

    # -- access --------------------------------------------------------------------------------
    def value(self, key: str, default=None):
        v = self.fields.get(key)
        return default if v is None else v.value

    @property
    def architecture(self) -> str | None:
        return self.value("general.architecture")

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes (uint8, a view of the file: nothing is read until used)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[t.offset:t.offset + t.n_bytes]


class _Short(Exception):
    """The parse ran past the bytes read so far."""


# ---------------------------------------------------------------------------------------------
# Writing: the same container, bytes equal to what gguf.GGUFWriter writes for the same input
# ---------------------------------------------------------------------------------------------
_PACK = {t: struct.Struct("<" + code) for t, (code, _) in _SCALARS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _encode_string(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return _U64.pack(len(b)) + b


def encode_value(v: Value) -> bytes:
    """type u32 + payload, little-endian."""
    head = _U32.pack(v.type)
    if v.type in _PACK:
        return head + _PACK[v.type].pack(v.value)
    if v.type == STRING:
        return head + _encode_string(v.value)
    if v.type != ARRAY or v.sub_type == ARRAY:
        raise ValueError(f"cannot encode GGUF value type {v.type} (sub type {v.sub_type})")
    items = v.value
    if not len(items):
        raise ValueError("a GGUF array cannot be empty")
    head += _U32.pack(v.sub_type) + _U64.pack(len(items))
    if v.sub_type == STRING:
        return head + b"".join(_encode_string(s) for s in items)
    dt = np.dtype(_SCALARS[v.sub_type][1]).newbyteorder("<")
    return head + np.asarray(items).astype(dt, copy=False).tobytes()


def encode_header(fields: dict[str, Value], tensors: list[tuple[str, tuple[int, ...], int, int]],
                  alignment: int = DEFAULT_ALIGNMENT) -> bytes:
    """GGUF v3 header: fields in order, then tensor infos (name, NumPy shape, ggml type, n_bytes),
    their data offsets laid out back to back at `alignment`; padded to where the data starts."""
    out = [MAGIC, _U32.pack(3), _U64.pack(len(tensors)), _U64.pack(len(fields))]
    for key, v in fields.items():
        out += [_encode_string(key), encode_value(v)]
    offset = 0
    for name, shape, gtype, n_bytes in tensors:
        dims = tuple(reversed(shape))
        out += [_encode_string(name), _U32.pack(len(dims)), *(_U64.pack(d) for d in dims), _U32.pack(gtype),
                _U64.pack(offset)]
        offset += -(-n_bytes // alignment) * alignment
    header = b"".join(out)
    return header + bytes(-len(header) % alignment)


def write_tensor(f, data: np.ndarray, alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Append one tensor's bytes and pad to the next alignment boundary (the file is aligned already)."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    f.write(memoryview(raw))
    f.write(bytes(-raw.nbytes % alignment))
