"""formats/gguf_file.py: the header reads like gguf.GGUFReader and writes like gguf.GGUFWriter."""
import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf_fixtures import TinySpec, write_tiny_gguf

from r1kit.formats.gguf_file import GGUFHeader, GGUFHeaderError, Value, encode_header, write_tensor


def reader_value(field):
    main = field.types[0]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    if main != GGUFValueType.ARRAY:
        return field.parts[field.data[0]][0].item()
    if field.types[-1] == GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode() for i in field.data]
    return np.concatenate([field.parts[i] for i in field.data]).tolist()


def test_reads_what_gguf_reader_reads(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(vocab=300, n_layer=2))
    ours, ref = GGUFHeader(path), GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        v = ours.fields[key]
        got = v.value.tolist() if isinstance(v.value, np.ndarray) else v.value
        assert v.type == field.types[0] and got == reader_value(field), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.offset == b.data_offset and np.array_equal(ours.data(a), np.asarray(b.data).view(np.uint8).ravel())


def test_writes_what_gguf_writer_writes(tmp_path):
    fields = {"general.architecture": Value("llama", GGUFValueType.STRING),
              "llama.block_count": Value(2, GGUFValueType.UINT32),
              "llama.rope.freq_base": Value(1e4, GGUFValueType.FLOAT32),
              "tokenizer.ggml.add_bos_token": Value(False, GGUFValueType.BOOL),
              "tokenizer.ggml.tokens": Value(["a", "é", "<|im_end|>"], GGUFValueType.ARRAY, GGUFValueType.STRING),
              "tokenizer.ggml.scores": Value(np.array([0.5, -1.0, 2.0], np.float32), GGUFValueType.ARRAY,
                                             GGUFValueType.FLOAT32),
              "tokenizer.ggml.token_type": Value(np.array([1, 1, 3], np.int32), GGUFValueType.ARRAY,
                                                 GGUFValueType.INT32)}
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b.weight": np.ones(5, np.float32)}
    w = GGUFWriter(tmp_path / "ref.gguf", "llama")
    for k, v in fields.items():
        if k != "general.architecture":
            val = v.value.tolist() if isinstance(v.value, np.ndarray) else v.value
            w.add_key_value(k, val, GGUFValueType(v.type), sub_type=v.sub_type and GGUFValueType(v.sub_type))
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file()
    for t in tensors.values():
        w.write_tensor_data(t)
    w.close()
    with open(tmp_path / "ours.gguf", "wb") as f:
        f.write(encode_header(fields, [(n, t.shape, 0, t.nbytes) for n, t in tensors.items()]))
        for t in tensors.values():
            write_tensor(f, t)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_truncated_and_foreign_files_are_one_line_errors(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, TinySpec(vocab=300, n_layer=2))
    raw = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(GGUFHeaderError, match=r"cut\.gguf: tensor '.*' runs past the end of the file"):
        GGUFHeader(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(raw[:200])
    with pytest.raises(GGUFHeaderError, match=r"head\.gguf: truncated GGUF header"):
        GGUFHeader(tmp_path / "head.gguf")
    (tmp_path / "x.gguf").write_bytes(b"{}")
    with pytest.raises(GGUFHeaderError, match="not a GGUF file"):
        GGUFHeader(tmp_path / "x.gguf")
