"""The README's quickstart runs as written; the quickstart job trains."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python block"
  exec(compile(blocks[0], "README.md", "exec"), {})


def test_quickstart_job_loss_falls():
  out = subprocess.run([sys.executable, str(ROOT / "experiments/quickstart.py"), "--steps", "30",
                        "--batch", "8"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "trainable params:" in out.stdout and "loss" in out.stdout


def test_readme_classification_table_is_the_committed_json():
  sys.path.insert(0, str(ROOT / "experiments"))
  import json
  import readme_tables
  results = json.loads((ROOT / "experiments/results/compare_classification.json").read_text())
  text = (ROOT / "README.md").read_text()
  assert readme_tables.render(text, results) == text, (
      "README.md's classification table differs from the JSON: run "
      "python experiments/readme_tables.py")
