"""Adapter checkpoints written by peftjax 0.1 (manifest format 1) still restore, bit for bit.

``tests/fixtures/adapters_v1/<method>/`` holds one adapter checkpoint per node kind as peftjax 0.1
wrote it (node types named ``module.qualname``), with ``expected.npz``: the trainable leaves it
holds, keyed by path. The targets are rebuilt here exactly as ``tests/fixtures/make_adapters_v1.py``
built the trees it saved (same base, same ``apply`` calls; prompt tuning now returns a
``peftjax.Tuned`` instead of the 0.1 dict). A round trip through the current format (2, node types
by ``type_id``) must give the same manifest apart from the type names.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax._src import nodes as nodes_lib
from peftjax._src.targeting import path_str
from peftjax.io.checkpoint import (FORMAT_VERSION, adapter_manifest, read_manifest,
                                   restore_adapter, save_adapter)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adapters_v1"
KEY = jax.random.key(0)


def make_base(kv_dim: int = 16, dtype=jnp.float32):
  """The base of make_adapters_v1.py (``kv_dim``/``dtype`` other than the defaults: a wrong one)."""
  rng = np.random.RandomState(0)
  n = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), dtype)
  return {"embed_tokens": {"embedding": n(32, 16)},
          "layers": {"self_attn": {"q_proj": {"kernel": n(2, 16, 16), "bias": n(2, 16)},
                                   "v_proj": {"kernel": n(2, 16, kv_dim), "bias": n(2, kv_dim)},
                                   "o_proj": {"kernel": n(2, 16, 16)}},
                     "mlp": {"down_proj": {"kernel": n(2, 16, 16)}}},
          "lm_head": {"kernel": n(16, 32)}}


#: method -> the apply() call of make_adapters_v1.py
CASES = {
    "lora": lambda b: peftjax.lora.apply(b, rank=2, alpha=4, targets=["q_proj", "v_proj"],
                                         dropout=0.1, key=KEY),
    "ia3": lambda b: peftjax.ia3.apply(b, targets=["v_proj"], feedforward=["down_proj"]),
    "adapters": lambda b: peftjax.adapters.apply(b, bottleneck=4, targets=["o_proj"], key=KEY),
    "bitfit": lambda b: peftjax.bitfit.apply(b),
    "diff_pruning": lambda b: peftjax.diff_pruning.apply(b, targets=["o_proj"]),
    "prompt": lambda b: peftjax.prompt.apply(b, 3, key=KEY),
}


def test_every_fixture_has_a_case():
  assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(CASES)


@pytest.fixture(scope="module")
def base():
  return make_base()


@pytest.fixture
def fixture_dir(tmp_path):
  """A copy of the fixture (restoring must not need to write, but never risk the originals)."""
  return lambda name: Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def expected(name) -> dict:
  with np.load(FIXTURES / name / "expected.npz", allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def trainable_leaves(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(peftjax.split(tree)[0])
  return {path_str(p): np.asarray(x) for p, x in flat}


def assert_bit_identical(got: dict, want: dict, what: str):
  assert sorted(got) == sorted(want), what
  for k, w in want.items():
    g = got[k]
    assert (g.dtype, g.shape) == (w.dtype, w.shape), f"{what}: {k}"
    assert g.tobytes() == w.tobytes(), f"{what}: {k} differs"


def assert_same_frozen(restored, template):
  """The frozen leaves (base weights) are the target's: the checkpoint holds none of them."""
  got, want = (jax.tree.leaves(peftjax.split(t)[1]) for t in (restored, template))
  assert len(got) == len(want) > 0
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and np.asarray(g).tobytes() == np.asarray(w).tobytes()


def nodes_by_path(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(peftjax.as_tuned(tree), is_leaf=nodes_lib.is_node)
  return {path_str(p).removeprefix("params/"): x for p, x in flat if nodes_lib.is_node(x)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_v1_fixture_restores_bit_for_bit(name, base, fixture_dir):
  d = fixture_dir(name)
  m = read_manifest(d)
  assert m["format_version"] == 1 and m["peftjax_version"] == "0.1.0"
  assert all("." in n["type"] for n in m["nodes"])  # format 1: module.qualname
  want = expected(name)
  template = CASES[name](base)
  # the template's own (untrained) leaves differ: a pass means the values came from the checkpoint
  assert any(not np.array_equal(trainable_leaves(template)[k], v) for k, v in want.items())

  back = restore_adapter(d, template)
  assert jax.tree.structure(back) == jax.tree.structure(template)
  assert_bit_identical(trainable_leaves(back), want, f"{name} onto its template")
  assert_same_frozen(back, template)

  # onto the base alone, where the manifest says every node can be rebuilt from it
  assert all(n["rebuildable"] for n in m["nodes"]), name
  for target in (base, {"params": base}):
    back = restore_adapter(d, target)
    assert jax.tree.structure(peftjax.as_tuned(back)) == \
        jax.tree.structure(peftjax.as_tuned(template)), name
    got = {k.removeprefix("params/"): v for k, v in trainable_leaves(back).items()}
    assert_bit_identical(got, want, f"{name} onto the base")
    assert_same_frozen(back, template)
    # each node rebuilt from the manifest: its class and its config
    rebuilt = nodes_by_path(back)
    assert sorted(rebuilt) == sorted(n["path"] for n in m["nodes"])
    for n in m["nodes"]:
      node = rebuilt[n["path"]]
      assert type(node) is nodes_lib.node_type(n["type"])
      for k, v in n["static"].items():
        assert json.loads(json.dumps(getattr(node, k))) == v, (name, n["path"], k)


@pytest.mark.parametrize("name", sorted(CASES))
def test_v1_fixture_refuses_a_wrong_base(name, fixture_dir):
  d = fixture_dir(name)
  wide = make_base(kv_dim=24)
  with pytest.raises(ValueError, match=r"different base model.*layers/self_attn/v_proj/"):
    restore_adapter(d, wide)
  with pytest.raises(ValueError, match=r"different base model.*model bfloat16"):
    restore_adapter(d, make_base(dtype=jnp.bfloat16))


def test_v1_fixture_refuses_another_method(base, fixture_dir):
  d = fixture_dir("lora")
  with pytest.raises(ValueError, match="IA3Weight in the target, LoraWeight in the checkpoint"):
    restore_adapter(d, peftjax.ia3.apply(base, targets=["q_proj", "v_proj"], feedforward=[]))
  with pytest.raises(ValueError, match=r"config \{'scale': 4.0.*differs"):
    restore_adapter(d, peftjax.lora.apply(base, rank=2, alpha=8, targets=["q_proj", "v_proj"],
                                          dropout=0.1, key=KEY))
  with pytest.raises(ValueError, match="which the checkpoint does not have"):
    restore_adapter(d, peftjax.lora.apply(base, rank=2, alpha=4, dropout=0.1, key=KEY,
                                          targets=["q_proj", "v_proj", "o_proj"]))


def test_v1_fixture_with_an_unknown_type_is_refused(base, fixture_dir):
  d = fixture_dir("ia3")
  mf = d / "manifest" / "metadata"
  m = json.loads(mf.read_text())
  m["nodes"][0]["type"] = "peftjax.ia3.IA4Weight"
  mf.write_text(json.dumps(m))
  with pytest.raises(ValueError, match="'peftjax.ia3.IA4Weight', which is not a registered"):
    restore_adapter(d, base)


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_through_the_current_format(name, base, fixture_dir, tmp_path):
  d = fixture_dir(name)
  old = read_manifest(d)
  tuned = restore_adapter(d, CASES[name](base))
  new_dir = save_adapter(tmp_path / "v2" / name, tuned)
  new = read_manifest(new_dir)
  assert new == json.loads(json.dumps(adapter_manifest(tuned)))
  assert new["format_version"] == FORMAT_VERSION == 2
  # node types by type_id, resolving to the classes the format-1 names resolve to
  assert [nodes_lib.node_type(n["type"]) for n in new["nodes"]] == \
      [nodes_lib.node_type(n["type"]) for n in old["nodes"]]
  assert [n["type"] for n in new["nodes"]] == \
      [nodes_lib.node_type(n["type"]).type_id for n in old["nodes"]]
  assert sorted(new["methods"]) == sorted(nodes_lib.node_type(t).type_id for t in old["methods"])
  # everything else is as format 1 had it: the declared roles agree with what 0.1 found
  strip = lambda m: [{k: v for k, v in n.items() if k != "type"} for n in m["nodes"]]
  assert strip(new) == strip(old)
  for k in ("leaves", "frozen_leaves", "base"):
    assert new[k] == old[k], k
  for target in (CASES[name](base), base):
    back = restore_adapter(new_dir, target)
    got = {k.removeprefix("params/"): v for k, v in trainable_leaves(back).items()}
    assert_bit_identical(got, expected(name), f"{name} via format 2")
