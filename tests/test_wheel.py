"""A plain ``pip install`` runs the README's commands: the wheel, in a clean venv, no extras.

Builds a wheel of this checkout, installs it into a new virtual environment with no extras (pip
resolves the declared dependencies, from its cache when it has them), and runs ``peftjax
methods``, ``peftjax generate --model smollm2`` (a few tokens; the chat template needs jinja2,
which only a runtime dependency provides) and a 3-step ``peftjax train`` from that venv, outside
the source tree. It runs in the newest-Python suite (``make test-newest``): what a new user gets.
"""

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="the wheel install runs once, in the newest-Python suite "
                                       "(make test-newest)")


def _run(cmd, cwd, env, timeout=900):
  proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, (f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                f"{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("wheel")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
  env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
        tmp / "dist", ROOT], cwd=tmp, env=env)
  wheels = list((tmp / "dist").glob("peftjax-*.whl"))
  assert len(wheels) == 1, wheels
  venv.create(tmp / "venv", with_pip=True)
  py = tmp / "venv" / "bin" / "python"
  _run([py, "-m", "pip", "install", "-q", wheels[0]], cwd=tmp, env=env)
  return tmp, tmp / "venv" / "bin" / "peftjax", env


def test_methods_from_the_wheel(installed):
  tmp, peftjax_cmd, env = installed
  out = _run([peftjax_cmd, "methods"], cwd=tmp, env=env).stdout
  assert [line.split()[0] for line in out.strip().splitlines()][:3] == ["lora", "qlora",
                                                                        "dora"]


def test_generate_from_the_wheel(installed):
  tmp, peftjax_cmd, env = installed
  out = _run([peftjax_cmd, "generate", "--model", "smollm2", "--prompt", "The whale",
              "--max-new-tokens", "4"], cwd=tmp, env=env).stdout
  assert out.strip(), "generate printed nothing"


def test_train_from_the_wheel(installed):
  tmp, peftjax_cmd, env = installed
  proc = _run([peftjax_cmd, "train", "--model", "minilm", "--method", "lora", "--data",
               "rotten_tomatoes", "--steps", "3", "--batch-size", "4", "--eval-limit", "8",
               "--seq-len", "32",
               "--no-baseline", "--warmup", "0", "--out", tmp / "run"], cwd=tmp, env=env)
  # LoRA 331,776 + the classifier 770 + the pooler 147,840 (a sentence-transformers checkpoint)
  assert re.search(r"^\| lora \+ head +\| 480,386 ", proc.stdout, re.M), proc.stdout
  assert (tmp / "run" / "adapter" / "manifest").exists()
