"""The README's two commands exist and the main job they run works on the embedded default."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_target(name: str) -> list[str]:
    """The recipe lines of a Makefile target."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{name}:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, f"Makefile has no {name} target"
    return [line.strip() for line in m.group(1).splitlines()]


def test_readme_names_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "pytest" in " ".join(make_target("test"))


def test_main_job_runs_on_the_embedded_default(tmp_path):
    recipe = make_target("demo")[-1]
    assert recipe == "$(BIN)/coserve demo"
    out = subprocess.run([sys.executable, "-m", "coserve.engine.cli", "demo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    taught = re.findall(r"demo-job -> '(.*)'   \(taught: '(.*)'\)", out.stdout)
    assert len(taught) == 5 and all(got == want for got, want in taught), out.stdout[-2000:]
    assert re.search(r"while serving [1-9]\d* inference tokens", out.stdout)
    assert "checkpoint written: adapters/demo-job/checkpoint-" in out.stdout
    assert (tmp_path / "model" / "model.safetensors").is_file()
