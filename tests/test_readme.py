"""The README's quickstart runs as written; the quickstart job trains."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python block"
  exec(compile(blocks[0], "README.md", "exec"), {})


@pytest.mark.newest_only
def test_quickstart_job_loss_falls():
  out = subprocess.run([sys.executable, str(ROOT / "experiments/quickstart.py"), "--steps", "30",
                        "--batch", "8"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "trainable params:" in out.stdout and "loss" in out.stdout


def test_readme_tables_are_the_committed_json():
  """The README's result and performance tables, and docs/methods.md's "Measured" paragraphs,
  are generated from the committed JSON."""
  sys.path.insert(0, str(ROOT / "experiments"))
  import readme_tables
  text = (ROOT / "README.md").read_text()
  assert readme_tables.render_all(text) == text, (
      "README.md's generated tables differ from the JSON: run python experiments/readme_tables.py")
  for path, new in readme_tables.render_docs().items():
    assert new == path.read_text(), (
        f"{path.name}'s generated paragraphs differ from the JSON: run python "
        f"experiments/readme_tables.py")


def test_readme_quotes_no_speed_figure_outside_the_generated_block():
  """Step times and ratios against the peers come from benchmarks/results/cpu.json only."""
  import re
  text = (ROOT / "README.md").read_text()
  begin, end = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
  outside = text.split(begin)[0] + text.split(end)[1]
  section = outside.split("## Performance", 1)[1].split("\n## ", 1)[0]
  assert not re.search(r"\d\.\d+x|\d+\.\d+ s/step|\d+% of", section), section
