"""Whether llama.cpp can decode a GGUF on this machine without crashing the test process.

A llama-cpp-python wheel compiled for the CPU it was built on (GGML_NATIVE, the default) takes llama.cpp's AMX
backend on a CPU with AMX, and on some Sapphire-Rapids-class virtual machines that segfaults in the first
matmul (ggml-org/llama.cpp#20824; measured here on an AMX Xeon VM: Q4_1 and F16 files crash, F32 ones run):
the test process dies with it, and every later test is lost. So a test that decodes with llama.cpp first
runs the same load, with the same settings, and a short eval in a child process; when the child dies, the
test skips with the reason and the way out (a build without AMX).
"""
from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REBUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
           '-DGGML_AVX512=ON" pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36')

_CHILD = """
import json, sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_threads=1, verbose=False, **json.loads(sys.argv[2]))
llm.eval([1, 2, 3, 4])
llm.close()
"""


@functools.lru_cache(maxsize=None)
def decode_failure(path: str, settings: str = "{}") -> str | None:
    """None when llama.cpp loads `path` with `settings` (JSON keyword arguments of llama_cpp.Llama) and evaluates
    4 tokens in a child process; else why not."""
    try:
        run = subprocess.run([sys.executable, "-c", _CHILD, path, settings], capture_output=True, text=True,
                             timeout=300)
    except subprocess.TimeoutExpired:
        return f"llama.cpp did not finish a 4-token eval of {Path(path).name} in 300 s"
    if run.returncode == 0:
        return None
    if run.returncode < 0:
        how = signal.Signals(-run.returncode).name
        return (f"llama.cpp dies with {how} decoding {Path(path).name} on this CPU (with a native build on an AMX "
                f"CPU the known cause is its AMX backend, ggml-org/llama.cpp#20824); rebuild it without: {REBUILD}")
    tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
    return f"llama.cpp could not decode {Path(path).name} (exit {run.returncode}): {tail}"


def open_llama(llama_cpp, path, **settings):
    """llama_cpp.Llama(path, n_threads=1, verbose=False, **settings), after a child process decoded `path` with
    the same settings; skips the calling test when it could not (decode_failure says why). A vocab-only load
    runs no matmul: no child then."""
    if not settings.get("vocab_only"):
        why = decode_failure(str(path), json.dumps(settings, sort_keys=True))
        if why is not None:
            pytest.skip(why)
    return llama_cpp.Llama(str(path), n_threads=1, verbose=False, **settings)
