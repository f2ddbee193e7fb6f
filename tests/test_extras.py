"""Optional extras: the main job imports without them, and a feature that needs one says which in one line."""
import importlib
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from r1kit.common import EXTRAS, MissingExtra, require

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def forget(monkeypatch):
    """forget(*modules): block them (as if not installed) and drop r1kit's cached modules, so they
    import again; afterwards r1kit's modules are exactly the ones from before (no stray copies
    whose exception classes would differ from the originals)."""
    before = {name: mod for name, mod in sys.modules.items() if name.startswith("r1kit.")}

    def block(*modules):
        for name in modules:  # the package and its already-imported submodules (pyarrow.parquet …)
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.setitem(sys.modules, loaded, None)
            monkeypatch.setitem(sys.modules, name, None)
        for name in before:
            if name not in ("r1kit.common", "r1kit.cli"):
                del sys.modules[name]
    yield block
    for name in [m for m in sys.modules if m.startswith("r1kit.")]:
        del sys.modules[name]
    sys.modules.update(before)
    for name, mod in before.items():  # a re-import also rebound the parent package's attribute
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, mod)


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtra, match=r"^GGUF export needs the 'gguf' package: pip install 'r1kit\[gguf\]'$"):
        require("gguf", "GGUF export")
    assert require("json", "x") is json  # an installed module is simply returned


def test_gguf_missing_from_python_and_cli(forget, capsys):
    forget("gguf")
    with pytest.raises(ImportError, match=r"pip install 'r1kit\[gguf\]'"):
        importlib.import_module("r1kit.formats.gguf")
    from r1kit.cli import main
    for argv in (["export", "ckpt", "--gguf", "out.gguf"], ["fit", "qwen2.5-7b"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith("pip install 'r1kit[gguf]'"), err


def test_math_verify_missing_from_python(forget):
    forget("math_verify")
    rewards = importlib.import_module("r1kit.rewards")
    with pytest.raises(MissingExtra, match=r"pip install 'r1kit\[math\]'"):
        rewards.math_verify_equal("1", "1")


@pytest.mark.parametrize("module, suffix", [("math_verify", ".jsonl"), ("pyarrow", ".parquet")])
def test_math_file_task_without_its_extra_from_the_cli(forget, capsys, tmp_path, module, suffix):
    forget(module)
    data = tmp_path / f"d{suffix}"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    from r1kit.cli import main
    argv = ["grpo", "--set", "task=math_file", "--set", f'task_args={{ path = "{data}" }}',
            "--set", f'base="{tmp_path / "ckpt"}"', "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("pip install 'r1kit[math]'"), err


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_its_extra(forget, capsys, tmp_path, module):
    """fastapi is imported with the server module, uvicorn only when it starts: one line either way."""
    forget(module)
    from r1kit.cli import main
    assert main(["serve", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("pip install 'r1kit[serve]'"), err


def test_the_demo_needs_no_extra():
    """In a fresh interpreter with every optional package blocked, the demo's modules import and
    its task is graded."""
    blocked = sorted(EXTRAS)
    code = textwrap.dedent(f"""
        import random, sys
        for m in {blocked!r}:
            sys.modules[m] = None
        import r1kit.recipe, r1kit.report, r1kit.cli
        from r1kit.tasks import get_task
        task = get_task("arithmetic", digits=2)
        p = task.problems("test", 1)[0]
        assert task.reward(task.trace(p, random.Random(0)), p)["accuracy"] == 1.0
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr


def test_extras_in_pyproject_match_the_table():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, core = project["optional-dependencies"], " ".join(project["dependencies"])
    for module, (dist, extra) in EXTRAS.items():
        listed = " ".join(extras[extra])
        assert dist in listed or module == "sympy", f"extra {extra!r} does not install {dist}"
        assert dist not in core, f"{dist} is optional (extra {extra!r}) but still a core dependency"
    assert "math-verify" in " ".join(extras["math"])  # sympy comes with math-verify
    [itself] = [d for d in extras["dev"] if d.startswith("r1kit[")]  # dev installs the extras the tests use
    assert {"gguf", "math", "serve"} <= set(itself.removeprefix("r1kit[").removesuffix("]").split(","))
