"""GGUF quantization: r1kit.formats.quants.quantize_gguf vs llama.cpp's llama_model_quantize.

Shapes: "256" — random llama, hidden 512, 8 layers, ffn 1536 (every row a multiple of 256, so each
weight takes its K-quant); "smollm2" — random weights in SmolLM2-135M's shape (hidden 576, 30 layers,
9 / 3 heads, ffn 1536, 49,152-token vocabulary, tied): 576-wide rows fall back to Q5_1 / Q8_0 as
llama.cpp's rules say, and the header carries a real-sized vocabulary. Mixes Q8_0, Q5_K_M, Q4_K_M.
Both sides on one thread (llama.cpp nthread=1; torch/NumPy limited to one thread), interleaved, best
of `--repeat`. Prints each wall time and each CPU time (this process's, which both sides run in: on a
shared machine it leaves out the time spent waiting for a core), whether the files are byte-identical,
then `cpu_ratio_vs_llamacpp=<worst>` and last `time_ratio_vs_llamacpp=<worst ours / llama.cpp wall
time over all cases>`.
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from gguf_fixtures import TinySpec, write_tiny_gguf  # noqa: E402

from r1kit.formats.quants import MIXES, quantize_gguf  # noqa: E402

SHAPES = {
    "256": TinySpec(arch="llama", hidden=512, ffn=1536, vocab=512, n_layer=8, n_head=8, n_kv=4, seed=1),
    "smollm2": TinySpec(arch="llama", hidden=576, ffn=1536, vocab=49152, n_layer=30, n_head=9, n_kv=3, tied=True,
                        seed=1),
}


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn(*args)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def llama_quantize(src: Path, dst: Path, mix: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix].ftype)
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with code {rc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--mixes", nargs="+", default=["Q8_0", "Q5_K_M", "Q4_K_M"])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    worst = worst_cpu = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            src = Path(tmp, f"{shape}.gguf")
            write_tiny_gguf(src, SHAPES[shape])
            for mix in args.mixes:
                ref, out = Path(tmp, "llama.gguf"), Path(tmp, "ours.gguf")
                t_ref = t_ours = c_ref = c_ours = float("inf")
                for _ in range(args.repeat):  # interleaved, so load on the machine hits both alike
                    wall, cpu = timed(llama_quantize, src, ref, mix)
                    t_ref, c_ref = min(t_ref, wall), min(c_ref, cpu)
                    wall, cpu = timed(quantize_gguf, src, out, mix)
                    t_ours, c_ours = min(t_ours, wall), min(c_ours, cpu)
                same = out.read_bytes() == ref.read_bytes()
                worst, worst_cpu = max(worst, t_ours / t_ref), max(worst_cpu, c_ours / c_ref)
                print(f"{shape:8s} {mix:7s} llama.cpp {t_ref:6.2f} s  r1kit {t_ours:6.2f} s  "
                      f"ratio {t_ours / t_ref:.2f}  (cpu {c_ref:5.2f} s / {c_ours:5.2f} s, ratio "
                      f"{c_ours / c_ref:.2f})  byte_identical={same}", flush=True)
    print(f"cpu_ratio_vs_llamacpp={worst_cpu:.2f}")
    print(f"time_ratio_vs_llamacpp={worst:.2f}")


if __name__ == "__main__":
    main()
