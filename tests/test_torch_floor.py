"""pyproject's torch floor is the first torch release that has every torch API r1kit uses.

No CPU wheel of an old torch is on the package index here, so instead of installing the floor in
a second venv, each API whose first release is at or after 2.0 is listed with that release; the
package source is searched for it.
"""
import re
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

# (pattern in r1kit's source, first torch release with it, what it is, a probe that the name is
# real in the installed torch, so a typo in this table cannot pass unnoticed)
FIRST_TORCH = [
    (r"\benable_gqa\s*=", (2, 5), "F.scaled_dot_product_attention(enable_gqa=...)",
     lambda: "enable_gqa" in F.scaled_dot_product_attention.__doc__),
    (r"\bflex_attention\b", (2, 5), "torch.nn.attention.flex_attention",
     lambda: __import__("torch.nn.attention.flex_attention", fromlist=["flex_attention"]).flex_attention),
    (r"\bnn\.Buffer\b", (2, 5), "torch.nn.Buffer", lambda: torch.nn.Buffer),
    (r"\bfully_shard\b", (2, 6), "torch.distributed.fsdp.fully_shard (public)",
     lambda: __import__("torch.distributed.fsdp", fromlist=["fully_shard"]).fully_shard),
    (r"\btorch\.accelerator\b", (2, 6), "torch.accelerator", lambda: torch.accelerator.is_available),
    (r"\brms_norm\(", (2, 4), "F.rms_norm", lambda: F.rms_norm),
    (r"\bnn\.RMSNorm\b", (2, 4), "torch.nn.RMSNorm", lambda: torch.nn.RMSNorm),
    (r"\badd_safe_globals\b", (2, 4), "torch.serialization.add_safe_globals",
     lambda: torch.serialization.add_safe_globals),
    (r"\bcustom_op\b", (2, 4), "torch.library.custom_op", lambda: torch.library.custom_op),
    (r"\bsdpa_kernel\b", (2, 3), "torch.nn.attention.sdpa_kernel",
     lambda: __import__("torch.nn.attention", fromlist=["sdpa_kernel"]).sdpa_kernel),
    (r"\bget_default_device\b", (2, 3), "torch.get_default_device", lambda: torch.get_default_device),
    (r"\btorch\.uint(16|32|64)\b", (2, 3), "unsigned 16/32/64-bit dtypes", lambda: torch.uint32),
    (r"\b[gs]et_model_state_dict\b", (2, 2), "torch.distributed.checkpoint.state_dict",
     lambda: __import__("torch.distributed.checkpoint.state_dict", fromlist=["x"]).get_model_state_dict),
    (r"\btorch\.compile\b", (2, 0), "torch.compile", lambda: torch.compile),
]


def floor() -> tuple[int, int]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if re.match(r"torch\b", d)]
    m = re.fullmatch(r"torch>=(\d+)\.(\d+)", spec.replace(" ", ""))
    assert m, f"pyproject: torch requirement {spec!r} is not of the form torch>=X.Y"
    return int(m[1]), int(m[2])


def used() -> dict[str, tuple[tuple[int, int], list[str]]]:
    """What of FIRST_TORCH the package uses → (first release, where)."""
    found = {}
    for path in sorted((ROOT / "r1kit").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern, version, what, _ in FIRST_TORCH:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.setdefault(what, (version, []))[1].append(f"{path.relative_to(ROOT)}:{line}")
    return found


def test_floor_covers_every_torch_api_used():
    too_new = {what: where for what, (version, where) in used().items() if version > floor()}
    assert not too_new, f"pyproject says torch>={'.'.join(map(str, floor()))} but r1kit uses {too_new}"


def test_floor_is_no_higher_than_the_apis_need():
    need = max((version for version, _ in used().values()), default=(2, 0))
    assert floor() == need, f"the newest torch API used needs {need}; pyproject's floor is {floor()}"


def test_readme_states_the_same_floor():
    assert f"torch>={'.'.join(map(str, floor()))}" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("pattern, version, what, probe", FIRST_TORCH, ids=[row[2] for row in FIRST_TORCH])
def test_table_names_real_torch_apis(pattern, version, what, probe):
    assert probe(), what
