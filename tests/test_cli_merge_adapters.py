"""`peftjax merge-adapters`: the adapter it writes is `peftjax.merge_adapters` of the adapters it
reads (HF PEFT directories here; train runs in test_cli), it loads back and serves, and every bad
input is a one-line error that names what was wrong."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import peftjax
from peftjax import cli, multi
from _cli import one_error, run
from peftjax.io import from_pretrained
from peftjax.io.hf_peft import load_hf_peft, save_hf_peft
from peftjax.lora import LoraWeight

FIX = Path(__file__).parent / "fixtures" / "hf_peft_tiny_llama"
BASE = FIX / "base"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The fixture's base and LoRA adapter, and a second LoRA adapter of the same structure (other
  values), saved in HF PEFT format."""
  _, params, _ = from_pretrained(BASE)
  first = load_hf_peft(FIX / "lora", params)
  keys = iter(jax.random.split(jax.random.key(7), 64))

  def other(x):
    if isinstance(x, LoraWeight):
      return x.replace(a=x.a + 0.1 * jax.random.normal(next(keys), x.a.shape, x.a.dtype),
                       b=x.b * -0.5 + 0.05 * jax.random.normal(next(keys), x.b.shape, x.b.dtype))
    return x
  second = jax.tree_util.tree_map(other, first, is_leaf=peftjax.is_node)
  d = tmp_path_factory.mktemp("adapters")
  save_hf_peft(second, d / "second")
  return params, {"x": first, "y": load_hf_peft(d / "second", params)}, d / "second"


def nodes(tree):
  return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=peftjax.is_node)
          if isinstance(x, LoraWeight)]


@pytest.mark.parametrize("method,extra", [("cat", []), ("svd", ["--rank", "3"]),
                                          ("dare_ties", ["--density", "0.5", "--seed", "3"])])
def test_the_written_adapter_is_merge_adapters_of_the_inputs(capsys, setup, tmp_path, method,
                                                             extra):
  params, trees, second = setup
  out = tmp_path / "merged"
  rc, so, err = run(capsys, "merge-adapters", "--model", BASE, "--adapter", f"x={FIX / 'lora'}",
                    "--adapter", f"y={second}", "--weights", "0.6,-0.4", "--method", method,
                    *extra, "--out", out)
  assert rc == 0, err
  assert so.strip() == f"wrote the merged adapter ({method} of x, y) to {out}"
  kw = dict(svd_rank=3 if method == "svd" else None, density=0.5 if "dare" in method else None,
            key=jax.random.key(3 if "dare" in method else 0))
  want = peftjax.merge_adapters(trees, [0.6, -0.4], method=method, **kw)
  got = load_hf_peft(out, params)
  assert len(nodes(got)) == len(nodes(want)) > 0
  for g, w in zip(nodes(got), nodes(want)):
    assert g.rank == w.rank and g.a.shape == w.a.shape
    np.testing.assert_allclose(np.asarray(g.scale * (g.a @ g.b)), np.asarray(w.scale * (w.a @ w.b)),
                               rtol=1e-5, atol=1e-6)
  if method == "cat":   # exact: the weighted sum of the updates
    for g, x, y in zip(nodes(got), nodes(trees["x"]), nodes(trees["y"])):
      np.testing.assert_allclose(np.asarray(g.scale * g.a @ g.b), np.asarray(
          0.6 * x.scale * x.a @ x.b - 0.4 * y.scale * y.a @ y.b), rtol=1e-5, atol=1e-6)
  marker = json.loads((out / cli.OUTPUT_MARKER).read_text())
  assert marker["command"] == "merge-adapters" and marker["combination"] == method
  assert marker["weights"] == [0.6, -0.4] and list(marker["adapters"]) == ["x", "y"]
  # it serves: one pool slot, as `peftjax serve --adapter merged=OUT` reads it
  pool = multi.stack({"merged": cli._read_onto(params, out), "x": trees["x"]})
  assert multi.slot_names(pool) == (None, "merged", "x")
  # and a second run into its own output is allowed (the marker says it is merge-adapters')
  assert run(capsys, "merge-adapters", "--model", BASE, "--adapter", FIX / "lora",
             "--adapter", second, "--out", out)[0] == 0


def test_bad_input_is_one_line_naming_it(capsys, setup, tmp_path):
  _, _, second = setup
  both = ["--model", BASE, "--adapter", f"x={FIX / 'lora'}", "--adapter", f"y={second}"]
  out = tmp_path / "o"
  e = one_error(capsys, "merge-adapters", *both, "--weights", "1,2,3", "--out", out)
  assert "--weights '1,2,3' gives 3 weights for 2 adapters (x, y)" in e
  e = one_error(capsys, "merge-adapters", *both, "--weights", "1,a", "--out", out)
  assert "--weights '1,a': expected numbers" in e
  e = one_error(capsys, "merge-adapters", "--model", BASE, "--adapter", f"x={FIX / 'lora'}",
                "--adapter", f"i={FIX / 'ia3'}", "--out", out)
  assert f"--adapter i={FIX / 'ia3'} holds IA3Weight nodes; merge-adapters combines LoRA" in e
  e = one_error(capsys, "merge-adapters", "--adapter", f"x={FIX / 'lora'}", "--out", out)
  assert "does not say which model it was trained on" in e and "give --model" in e
  e = one_error(capsys, "merge-adapters", *both, "--method", "ties", "--out", out)
  assert "method 'ties' needs density" in e
  e = one_error(capsys, "merge-adapters", *both, "--density", "1.5", "--method", "ties",
                "--out", out)
  assert "--density must be in (0, 1]" in e
  for opts, says in ((["--density", "0.5"], "--density does not apply to --method svd"),
                     (["--method", "ties", "--density", "0.5", "--rank", "2"],
                      "--rank does not apply to --method ties"),
                     (["--method", "cat", "--majority-sign", "frequency"],
                      "--majority-sign does not apply to --method cat")):
    assert says in one_error(capsys, "merge-adapters", *both, *opts, "--out", out)
  e = one_error(capsys, "merge-adapters", *both, "--out", second / "inside")
  assert "which this command reads" in e
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "notes.txt").write_text("mine")
  e = one_error(capsys, "merge-adapters", *both, "--out", tmp_path / "full")
  assert "holds other files (notes.txt)" in e
  assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
  e = one_error(capsys, "merge-adapters", *both, "--adapter", f"x={second}", "--out", out)
  assert "--adapter 'x' is given twice" in e
  e = one_error(capsys, "merge-adapters", "--model", BASE, "--adapter", tmp_path / "nope",
                "--out", out)
  assert "no such adapter directory" in e
  assert not out.exists()
