"""experiments/_runner.py: which learning rate each method's runs get (no process is started)."""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import _runner  # noqa: E402


def test_a_single_rate_is_passed_a_grid_is_swept_or_left_to_the_default(monkeypatch, tmp_path):
  """compare_lm.py gives one rate per method: every run must get it (a regression ran every LM
  method at its default rate, so the prefix-tuning rows at 1e-2 and 1e-3 were the same run).
  A grid is swept on the validation split when asked, else the default rate is used."""
  calls = []

  def fake_run(name, args, *, base_metrics=None, log_dir=None):
    calls.append((name, args))
    acc = {"0.001": "70.0%", "0.01": "80.0%"}.get(
        args[args.index("--lr") + 1] if "--lr" in args else "", "60.0%")
    return {"name": name, "row": {"test accuracy": acc}, "base_metrics": {"accuracy": 0.5}}

  monkeypatch.setattr(_runner, "run_method", fake_run)
  monkeypatch.setattr(_runner, "machine", lambda: {})
  methods = {"one": ("prefix", [], 1e-2, ""), "grid": ("lora", [], (1e-3, 1e-2), "")}
  lr_of = lambda args: args[args.index("--lr") + 1] if "--lr" in args else None
  for validation, want in ((0.1, {"one": ["0.01"], "grid": ["0.001", "0.01", "0.01"]}),
                           (0, {"one": ["0.01"], "grid": [None]})):
    calls.clear()
    a = argparse.Namespace(out=str(tmp_path), resume=False, report=False, steps=1,
                           validation=validation, seeds=1)
    _runner.run_all("t", a, methods, list(methods), [], lambda *x, **k: None,
                    score=lambda row: float(row["test accuracy"].rstrip("%")))
    got = {n: [lr_of(args) for name, args in calls if name.startswith(n)] for n in methods}
    assert got == want, validation


def test_rerun_keeps_each_old_row_until_its_new_one_is_written(monkeypatch, tmp_path):
  """A stopped `--resume --rerun` must not lose the rows it had not redone yet."""
  written = []
  monkeypatch.setattr(_runner, "machine", lambda: {})
  monkeypatch.setattr(_runner, "resume", lambda path, a, names: (
      [{"name": "a", "old": True}, {"name": "b", "old": True}], None))

  def fake_run(name, args, *, base_metrics=None, log_dir=None):
    if name == "b":
      raise KeyboardInterrupt   # stopped while redoing b
    return {"name": name, "row": {}}

  monkeypatch.setattr(_runner, "run_method", fake_run)
  a = argparse.Namespace(out=str(tmp_path), resume=True, rerun=True, report=False, steps=1,
                         validation=0, seeds=1)
  methods = {"a": ("lora", [], 1e-3, ""), "b": ("lora", [], 1e-3, "")}
  try:
    _runner.run_all("t", a, methods, ["a", "b"], [],
                    lambda out, a, info, results, base, final=False: written.append(
                        [(r["name"], r.get("old", False)) for r in results]))
  except KeyboardInterrupt:
    pass
  assert written[-1] == [("a", False), ("b", True)]
