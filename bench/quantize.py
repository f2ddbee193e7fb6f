"""Q5_K_M quantization of an F32 GGUF: r1kit.formats.quants.quantize_gguf vs llama.cpp.

Model: random llama, hidden 512, 8 layers, 8 heads / 4 KV heads, ffn 1536 (a multiple of 256,
so every weight takes a K-quant), vocab 512. Both sides run on one thread (llama.cpp with
nthread=1; NumPy ufuncs are single-threaded) and once each. Prints both times, whether the
two files are byte-identical, and `time_ratio_vs_llamacpp=<ours / llama.cpp>` last.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from gguf_fixtures import TinySpec, tensor_specs, write_tiny_gguf  # noqa: E402
from r1kit.formats.quants import MIXES, quantize_gguf  # noqa: E402

SPEC = TinySpec(arch="llama", hidden=512, ffn=1536, vocab=512, n_layer=8, n_head=8, n_kv=4, seed=1)
MIX = "Q5_K_M"


def llama_quantize(src: Path, dst: Path) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[MIX].ftype)
    params.nthread = 1
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with code {rc}")
    return elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, ours, ref = Path(tmp, "f32.gguf"), Path(tmp, "ours.gguf"), Path(tmp, "llama.gguf")
        write_tiny_gguf(src, SPEC)
        t_ref = llama_quantize(src, ref)
        t0 = time.perf_counter()
        quantize_gguf(src, ours, MIX)
        t_ours = time.perf_counter() - t0
        identical = ours.read_bytes() == ref.read_bytes()
    n_params = sum(int(np.prod(shape)) for _, shape in tensor_specs(SPEC)) / 1e6
    print(f"model: {n_params:.1f} M params (F32), mix {MIX}", flush=True)
    print(f"llama.cpp llama_model_quantize (nthread=1): {t_ref:.3f} s")
    print(f"r1kit quantize_gguf:                        {t_ours:.3f} s")
    print(f"byte_identical={identical}")
    print(f"time_ratio_vs_llamacpp={t_ours / t_ref:.2f}")


if __name__ == "__main__":
    main()
