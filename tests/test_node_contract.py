"""The node contract, checked once for every registered node type.

A node type gets every check here by being registered (``@node_dataclass``) and having an
example in :data:`EXAMPLES`; ``test_every_node_type_has_an_example`` fails for a new type
without one. Checked: role declarations, pytree round trip, ``trainable_mask`` structure,
``lift == merge`` for values and gradients (with and without ``jit``, f32 and bf16), ``astype``,
``set_rng``, scan (the node as a scanned-over stack and as a constant), and the adapter
checkpoint round trip.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import peftjax
from peftjax._src import nodes as nodes_lib
from peftjax._src.additive import Prefix, SoftPrompt
from peftjax._src.quant.core import quantize_array
from peftjax._src.selective import DiffPruningWeight, SliceTrainable, SparseDelta, Trainable
from peftjax.io.checkpoint import restore_adapter, save_adapter
from peftjax.lora import LoraWeight

D, L = 8, 3


def _arr(seed, *shape, scale=0.5):
  return jnp.asarray(np.random.RandomState(seed).normal(0, scale, shape), jnp.float32)


def _bert_config():
  from peftjax.models import BertConfig
  return BertConfig(vocab_size=16, hidden_size=D, num_layers=L, num_heads=2, intermediate_size=16)


def _adapter(stacked: bool, parallel: bool = False):
  w = _arr(0, L, D, D) if stacked else _arr(0, D, D)
  name = "layers" if stacked else "dense"
  tree = peftjax.adapters.apply({name: {"out_proj": {"kernel": w}}}, bottleneck=2,
                                targets=["out_proj"], key=jax.random.key(0),
                                placement="parallel" if parallel else "houlsby")
  node = tree[name]["out_proj"]["kernel"]
  return node.replace(up=_arr(9, *node.up.shape))   # up starts at zero: make the adapter act


def _pool(kind: str, stacked: bool):
  """An adapter pool of two adapters on one [D, D] kernel, routed for the rows ``_uses`` (4) or
  the scan test (2) feed it."""
  lead = (L,) if stacked else ()
  w = _arr(0, *lead, D, D)
  if kind == "lora":
    one = LoraWeight(w, _arr(1, *lead, D, 2), _arr(2, *lead, 2, D), scale=0.5)
    two = LoraWeight(w, _arr(3, *lead, D, 3), _arr(4, *lead, 3, D), scale=2.0)
  else:
    one = peftjax.ia3.IA3Weight(w, 1.0 + _arr(1, *lead, D))
    two = peftjax.ia3.IA3Weight(w, 1.0 + _arr(2, *lead, D))
  pool = peftjax.multi.stack({"one": {"k": one}, "two": {"k": two}}, slots=4)
  return peftjax.multi.route(pool, [2, 1] if stacked else [1, 2, 0, 1])["k"]


#: type_id -> (example node, a layer-stacked example [L, ...] or None). Kernels are [D, D].
EXAMPLES = {
    "lora": lambda: (LoraWeight(_arr(0, D, D), _arr(1, D, 2), _arr(2, 2, D), scale=0.5),
                     LoraWeight(_arr(0, L, D, D), _arr(1, L, D, 2), _arr(2, L, 2, D), scale=0.5)),
    "dora": lambda: (peftjax.dora.DoraWeight(_arr(0, D, D), _arr(1, D, 2), _arr(2, 2, D),
                                             1.0 + _arr(3, D, scale=0.1), scale=0.5),
                     peftjax.dora.DoraWeight(_arr(0, L, D, D), _arr(1, L, D, 2), _arr(2, L, 2, D),
                                             1.0 + _arr(3, L, D, scale=0.1), scale=0.5)),
    "vera": lambda: (peftjax.vera.VeraWeight(_arr(0, D, D), _arr(1, D, 3), _arr(2, 3, D),
                                             _arr(3, 3), _arr(4, D)),
                     peftjax.vera.VeraWeight(_arr(0, L, D, D), _arr(1, L, D, 3), _arr(2, L, 3, D),
                                             _arr(3, L, 3), _arr(4, L, D))),
    "loha": lambda: (peftjax.loha.LohaWeight(_arr(0, D, D), _arr(1, D, 2), _arr(2, 2, D),
                                             _arr(3, D, 2), _arr(4, 2, D), scale=0.5),
                     peftjax.loha.LohaWeight(_arr(0, L, D, D), _arr(1, L, D, 2), _arr(2, L, 2, D),
                                             _arr(3, L, D, 2), _arr(4, L, 2, D), scale=0.5)),
    "lokr": lambda: (peftjax.lokr.LokrWeight(_arr(0, D, D), _arr(1, 2, 4), a2=_arr(2, 4, 1),
                                             b2=_arr(3, 1, 2), scale=0.5),
                     peftjax.lokr.LokrWeight(_arr(0, L, D, D), _arr(1, L, 2, 2),
                                             w2=_arr(2, L, 4, 4), scale=0.5, rank=2)),
    "oft": lambda: (peftjax.oft.OftWeight(_arr(0, D, D), _arr(1, 2, 6), block_size=4),
                    peftjax.oft.OftWeight(_arr(0, L, D, D), _arr(1, L, 1, 6), block_size=4)),
    "quantized": lambda: (quantize_array(_arr(0, D, D), block_size=8), None),
    "trainable": lambda: (Trainable(_arr(0, D, D)), Trainable(_arr(0, L, D, D))),
    "slice_trainable": lambda: (SliceTrainable(_arr(0, D, D), _arr(1, 2, D), index=(1, 5)), None),
    "sparse_delta": lambda: (SparseDelta(_arr(0, D, D), jnp.array([3, 17, 40], jnp.int32),
                                         _arr(1, 3)), None),
    "diff_pruning": lambda: (
        DiffPruningWeight(_arr(0, D, D), _arr(1, D, D), _arr(2, D, D, scale=2.0)),
        DiffPruningWeight(_arr(0, L, D, D), _arr(1, L, D, D), _arr(2, L, D, D, scale=2.0),
                          n_batch=1)),
    "bottleneck_adapter": lambda: (_adapter(False), _adapter(True)),
    "ia3": lambda: (peftjax.ia3.IA3Weight(_arr(0, D, D), 1.0 + _arr(1, D)),
                    peftjax.ia3.IA3Weight(_arr(0, L, D, D), 1.0 + _arr(1, L, D))),
    "prompt_encoder": lambda: (peftjax.ptuning.apply(
        {"embed_tokens": {"embedding": _arr(0, 16, D)}}, 3, hidden=4).prompt, None),
    "prefix_mlp": lambda: (peftjax.prefix.init(_bert_config(), 2, hidden=4), None),
    "soft_prompt": lambda: (SoftPrompt(_arr(0, 3, D)), None),
    "prefix": lambda: (Prefix(_arr(0, L, 2, 2, 2, D // 2)), None),
    "lora_pool": lambda: (_pool("lora", False), _pool("lora", True)),
    "ia3_pool": lambda: (_pool("ia3", False), _pool("ia3", True)),
}

PEFTJAX_TYPES = {tid: cls for tid, cls in nodes_lib.node_types().items()
                 if cls.__module__.startswith("peftjax.")}
IDS = sorted(PEFTJAX_TYPES)


def example(tid, stacked=False):
  node, stack = EXAMPLES[tid]()
  return stack if stacked else node


def _uses(node):
  """A function of the node that exercises its rules: ``x @ W`` for kernels, else elementwise."""
  if node.ndim == 2 and node.shape == (D, D):
    x = _arr(7, 4, D).astype(node.dtype)
    return lambda w: jnp.tanh(x @ w).sum() + (x @ w)[0, 1]
  return lambda w: jnp.sum(jnp.tanh(w.astype(jnp.float32)) * 2.0)


def _tol(dtype, ref=None):
  """f32: 2e-5. bf16: 2e-2, the absolute part scaled by the reference's largest magnitude (a
  bf16 rounding is relative to the terms summed, not to the element: an OFT output of -1.35
  among values near 10 differs by 0.05 between the lifted and merged orders on jax 0.12)."""
  if dtype != jnp.bfloat16:
    return dict(rtol=2e-5, atol=2e-5)
  scale = 1.0 if ref is None else max(1.0, float(np.max(np.abs(np.asarray(ref, np.float32)))))
  return dict(rtol=2e-2, atol=2e-2 * scale)


def test_every_node_type_has_an_example():
  assert set(PEFTJAX_TYPES) == set(EXAMPLES), "register an example for every node type"


@pytest.mark.parametrize("tid", IDS)
def test_roles_are_declared_and_consistent(tid):
  cls = PEFTJAX_TYPES[tid]
  node = example(tid)
  assert cls.type_id == tid and nodes_lib.node_type(tid) is cls
  assert nodes_lib.node_type(f"{cls.__module__}.{cls.__qualname__}") is cls   # format-1 names
  data = cls.data_fields()
  assert set(cls.trainable_fields) <= set(data)
  if cls.base_field is not None:
    assert tuple(getattr(node, cls.base_field).shape) == tuple(node.shape)
  if node.base is not None:
    assert cls.base_field not in cls.trainable_fields
  static = {f.name for f in dataclasses.fields(cls) if f.metadata.get("static")}
  assert set(cls.execution_fields) <= static


@pytest.mark.parametrize("tid", IDS)
def test_pytree_round_trip_and_trainable_mask(tid):
  node = example(tid)
  leaves, treedef = jax.tree_util.tree_flatten(node)
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert type(back) is type(node) and jax.tree_util.tree_structure(back) == treedef
  for a, b in zip(jax.tree_util.tree_leaves(back), leaves):
    assert a is b
  mask = peftjax.trainable_mask(node)
  assert jax.tree_util.tree_structure(mask) == treedef
  want = []
  for f in type(node).data_fields():
    n = len(jax.tree_util.tree_leaves(getattr(node, f)))
    want += [f in type(node).trainable_fields] * n
  assert jax.tree_util.tree_leaves(mask) == want
  trainable, frozen = peftjax.split(node)
  assert jax.tree_util.tree_structure(peftjax.combine(trainable, frozen)) == treedef


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tid", IDS)
def test_lift_equals_merge_values_and_gradients(tid, dtype):
  node = example(tid)
  if dtype != jnp.float32:
    node = node.astype(dtype)
    if nodes_lib.is_node(node):
      assert node.dtype == dtype
  fn = _uses(node)
  lifted = peftjax.lift(fn)
  if not type(node).mergeable:
    with pytest.raises(TypeError, match="no merged form"):
      peftjax.merge(node)
    assert np.isfinite(float(lifted(node))) and np.isfinite(float(jax.jit(lifted)(node)))
    return
  want = fn(peftjax.merge(node))
  np.testing.assert_allclose(lifted(node), want, **_tol(dtype, want))
  np.testing.assert_allclose(jax.jit(lifted)(node), want, **_tol(dtype, want))
  trainable, frozen = peftjax.split(node)
  if not jax.tree_util.tree_leaves(trainable):
    return
  g = jax.grad(lambda t: lifted(peftjax.combine(t, frozen)))(trainable)
  gj = jax.jit(jax.grad(lambda t: lifted(peftjax.combine(t, frozen))))(trainable)
  gr = jax.grad(lambda t: fn(peftjax.merge(peftjax.combine(t, frozen))))(trainable)
  for a, b, c in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(gj),
                     jax.tree_util.tree_leaves(gr)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32),
                               **_tol(dtype, c))
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(c, np.float32),
                               **_tol(dtype, c))
  assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree_util.tree_leaves(gr))


@pytest.mark.parametrize("tid", IDS)
def test_astype_keeps_the_node_and_what_it_stands_for(tid):
  node = example(tid)
  cast = node.astype(jnp.bfloat16)
  assert cast.dtype == jnp.bfloat16 and tuple(cast.shape) == tuple(node.shape)
  if type(node).mergeable:
    np.testing.assert_allclose(np.asarray(peftjax.merge(cast), np.float32),
                               np.asarray(peftjax.merge(node), np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tid", IDS)
def test_set_rng_fills_and_clears_the_rng_field(tid):
  cls = PEFTJAX_TYPES[tid]
  node = example(tid)
  if tid in ("lora", "dora"):
    node = node.replace(dropout=0.5)
  out = peftjax.set_rng({"x": node}, jax.random.key(3))["x"]
  if cls.rng_field is None or not node.wants_rng():
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(node)
    return
  data = getattr(out, cls.rng_field)
  assert data.dtype == jnp.uint32 and data.shape == (*node.rng_shape(), 2)
  assert getattr(peftjax.set_rng({"x": out}, None)["x"], cls.rng_field) is None
  if type(node).mergeable:   # per-step randomness changes what a training step computes
    assert not np.allclose(peftjax.merge(out), peftjax.merge(node)) or tid in ("lora", "dora")


@pytest.mark.parametrize("tid", IDS)
def test_scan_over_a_stack_and_with_a_constant_node(tid):
  node, stack = EXAMPLES[tid]()
  fn = _uses(node)
  if type(node).mergeable:
    const = lambda t, xs: lax.scan(lambda c, x: (c + x * fn(t), None), 0.0, xs)[0]
    xs = jnp.arange(1.0, 4.0)
    np.testing.assert_allclose(peftjax.lift(const)(node, xs), const(peftjax.merge(node), xs),
                               rtol=2e-5, atol=2e-5)
  if stack is None:
    return
  x = _arr(8, 2, D)
  body = lambda c, w: (jnp.tanh(c @ w), (c @ w).sum())
  scanned = lambda t, x: lax.scan(body, x, t)
  got = jax.jit(peftjax.lift(scanned))(stack, x)
  if type(stack).mergeable:
    want = scanned(peftjax.merge(stack), x)
  else:   # the adapter's rule layer by layer, unrolled by hand
    want_c, ys = x, []
    for i in range(L):
      layer = jax.tree_util.tree_map(lambda a: a[i], stack)
      want_c, y = peftjax.lift(body)(want_c, layer)
      ys.append(y)
    want = (want_c, jnp.stack(ys))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("tid", IDS)
def test_checkpoint_round_trip(tid, tmp_path):
  node = example(tid)
  tree = {"layer": {"kernel": node}}
  if not jax.tree_util.tree_leaves(peftjax.split(tree)[0]):
    pytest.skip("no trainable leaves: nothing to checkpoint")
  save_adapter(tmp_path / "ckpt", tree)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, peftjax.split(tree)[0])
  template = peftjax.combine(zeros, peftjax.split(tree)[1])
  back = restore_adapter(tmp_path / "ckpt", template)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_this_module_runs_with_strict_dtype_promotion():
  """tests/conftest.py: the node contract runs with implicit dtype promotion refused."""
  with pytest.raises(jax.dtypes.TypePromotionError):
    jnp.ones(2, jnp.bfloat16) + jnp.ones(2, jnp.float32)
