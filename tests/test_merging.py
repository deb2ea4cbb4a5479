"""merge_adapters: every method against a NumPy transcription of its formula (HF PEFT's
``add_weighted_adapter`` / ``merge_utils``), against HF PEFT itself on a tiny torch model (DARE
with the same masks), layer-stacked and DenseGeneral kernels, jit, bf16, training the result, bad
input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax import merging
from peftjax._src.targeting import leaves_with_paths
from peftjax.lora import LoraWeight

KEY = jax.random.key(0)
FACTOR = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


def _base():
  rs = np.random.RandomState(1)
  return {"attn": {"q_proj": {"kernel": jnp.asarray(rs.randn(16, 12), jnp.float32)},
                   "o_proj": {"kernel": jnp.asarray(rs.randn(8, 2, 6), jnp.float32)}},
          "layers": {"mlp": {"up_proj": {"kernel": jnp.asarray(rs.randn(2, 8, 12), jnp.float32)}}}}


_LAYOUT = {"attn/q_proj/kernel": (0, 1), "attn/o_proj/kernel": (0, 1),
           "layers/mlp/up_proj/kernel": (1, 1), "q_proj/kernel": (0, 1), "v_proj/kernel": (0, 1)}


def _trained(params, rank, alpha, seed, dtype=jnp.float32):
  """A LoRA tree with random ("trained") A and B, built from NumPy (no per-shape compiles)."""
  rs = np.random.RandomState(100 + seed)

  def f(path, w):
    p = jax.tree_util.keystr(path, simple=True, separator="/")
    if p not in _LAYOUT or p.rsplit("/", 2)[-2] not in ("q_proj", "o_proj", "up_proj", "v_proj"):
      return w
    nb, ni = _LAYOUT[p]
    a = rs.randn(*w.shape[:nb + ni], rank)
    b = rs.randn(*w.shape[:nb], rank, *w.shape[nb + ni:])
    return LoraWeight(w=w, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), scale=alpha / rank,
                      n_in=ni)
  return jax.tree_util.tree_map_with_path(f, params)


def _nodes(tree):
  return {p: x for p, x in leaves_with_paths(tree) if isinstance(x, LoraWeight)}


# -- NumPy transcription of peft/utils/merge_utils.py -------------------------------------------

def np_magnitude(x, density, nb):
  if density >= 1:
    return x
  flat = x.reshape(int(np.prod(x.shape[:nb])), -1).copy()
  k = int(density * flat.shape[1])
  for row in flat:
    row[np.argsort(-np.abs(row), kind="stable")[k:]] = 0
  return flat.reshape(x.shape)


def np_combine(rule, xs, cs, density=None, msm="total", nb=0, keeps=None):
  if rule in ("ties", "magnitude_prune"):
    xs = [np_magnitude(x, density, nb) for x in xs]
  elif rule in ("dare_linear", "dare_ties"):
    xs = [x * k / density for x, k in zip(xs, keeps)]
  t = np.stack(xs)
  w = t * np.asarray(cs).reshape(-1, *[1] * (t.ndim - 1))
  if rule in ("ties", "dare_ties"):
    mag = t.sum(0) if msm == "total" else np.sign(t).sum(0)
    agree = np.sign(t) == np.where(mag >= 0, 1, -1)
    return (w * agree).sum(0) / np.maximum(agree.sum(0), 1)
  return w.sum(0)


def np_delta(node):
  nb, ni = node.n_batch, node.n_in
  a = np.asarray(node.a, np.float64)
  b = np.asarray(node.b, np.float64)
  r = a.shape[-1]
  lead = a.shape[:nb]
  d = (a.reshape(*lead, -1, r) @ b.reshape(*lead, r, -1)) * node.scale
  return d.reshape(node.shape)


def _masks(trees, path, part, method, density):
  drawn = merging.dare_masks(dict(zip("xyz", trees)), method=method, density=density, key=KEY)
  return [np.asarray(m[part]) for m in drawn[path]]


@pytest.mark.parametrize("method", ["cat"] + FACTOR + SVD)
def test_against_numpy(method):
  params = _base()
  equal = method in FACTOR
  trees = [_trained(params, 4, 8, 1), _trained(params, 4 if equal else 2, 4, 2),
           _trained(params, 4 if equal else 3, 3, 3)]
  weights = [0.7, -0.4, 1.3]
  kw = dict(density=0.4, majority_sign_method="frequency" if "ties_svd" in method else "total",
            key=KEY)
  svd_rank = 5 if method == "svd" else None
  merged = peftjax.merge_adapters(dict(zip("xyz", trees)), weights, method=method,
                                  svd_rank=svd_rank, **kw)
  for p, node in _nodes(merged).items():
    ins = [_nodes(t)[p] for t in trees]
    nb = node.n_batch
    assert node.scale == 1.0 and node.w is ins[0].w
    if method == "cat":
      assert node.rank == 9
      np.testing.assert_allclose(np_delta(node), sum(c * np_delta(n) for c, n in zip(weights, ins)),
                                 rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(node.a[..., :4], ins[0].a * (0.7 * 2.0), rtol=1e-6)
    elif method in FACTOR:
      ws = [c * n.scale for c, n in zip(weights, ins)]
      ca = [np.sign(w) * np.sqrt(abs(w)) for w in ws]
      cb = [np.sqrt(abs(w)) for w in ws]
      for part, cs in (("a", ca), ("b", cb)):
        keeps = _masks(trees, p, part, method, 0.4) if "dare" in method else None
        ref = np_combine(method, [np.asarray(getattr(n, part), np.float64) for n in ins], cs,
                         0.4, "total", nb, keeps)
        np.testing.assert_allclose(getattr(node, part), ref, rtol=1e-5, atol=1e-6, err_msg=part)
    else:
      assert node.rank == (5 if method == "svd" else 4)
      sub = "linear" if method == "svd" else method[:-4]
      keeps = _masks(trees, p, "delta", method, 0.4) if "dare" in method else None
      delta = np_combine(sub, [np_delta(n) for n in ins], weights, 0.4, kw["majority_sign_method"],
                         nb, keeps)
      k = int(np.prod(node.shape[nb:nb + node.n_in]))
      mats = delta.reshape(-1, k, delta[(0,) * nb].size // k)
      best = []
      for m in mats:                                              # per layer
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        best.append((u[:, :node.rank] * s[:node.rank]) @ vt[:node.rank])
      np.testing.assert_allclose(np_delta(node), np.stack(best).reshape(node.shape),
                                 rtol=1e-4, atol=1e-4)


def test_svd_at_full_rank_and_cat_are_exact():
  params = _base()
  trees = {"x": _trained(params, 4, 8, 1), "y": _trained(params, 2, 2, 2)}
  cat = peftjax.merge_adapters(trees, [1.0, 0.5], method="cat")
  svd = peftjax.merge_adapters(trees, {"y": 0.5, "x": 1.0}, method="svd", svd_rank=6)
  for p in _nodes(cat):
    want = np_delta(_nodes(trees["x"])[p]) + 0.5 * np_delta(_nodes(trees["y"])[p])
    np.testing.assert_allclose(np_delta(_nodes(cat)[p]), want, atol=1e-4)
    np.testing.assert_allclose(np_delta(_nodes(svd)[p]), want, atol=1e-4)


def test_one_adapter_is_linear_and_jit_matches_eager():
  params = _base()
  t = _trained(params, 4, 8, 1)
  one = peftjax.merge_adapters({"x": t}, [0.5], method="svd")
  node, src = _nodes(one)["attn/q_proj/kernel"], _nodes(t)["attn/q_proj/kernel"]
  np.testing.assert_allclose(node.a, src.a * np.sqrt(0.5 * 2.0), rtol=1e-6)  # HF PEFT does this
  trees = {"x": t, "y": _trained(params, 4, 4, 2)}
  for method in ("ties", "dare_ties", "svd"):
    f = lambda ts: peftjax.merge_adapters(ts, [0.6, 0.4], method=method, density=0.5, key=KEY)
    eager, jitted = f(trees), jax.jit(f)(trees)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # a different key draws different DARE masks
  other = peftjax.merge_adapters(trees, [0.6, 0.4], method="dare_linear", density=0.5,
                                 key=jax.random.key(1))
  same = peftjax.merge_adapters(trees, [0.6, 0.4], method="dare_linear", density=0.5, key=KEY)
  assert not np.array_equal(_nodes(other)["attn/q_proj/kernel"].a,
                            _nodes(same)["attn/q_proj/kernel"].a)


def test_bf16_and_the_merged_tree_trains():
  params = _base()
  trees = {"x": _trained(params, 4, 8, 1, jnp.bfloat16), "y": _trained(params, 4, 4, 2,
                                                                        jnp.bfloat16)}
  f32 = {n: jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, t)
         for n, t in trees.items()}
  for method in ("ties", "cat"):
    lo = _nodes(peftjax.merge_adapters(trees, [0.6, 0.4], method=method, density=0.5))
    hi = _nodes(peftjax.merge_adapters(f32, [0.6, 0.4], method=method, density=0.5))
    for p in lo:
      assert lo[p].a.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(lo[p].a, np.float32), hi[p].a, rtol=2e-2, atol=2e-2)
  merged = peftjax.merge_adapters(f32, [0.6, 0.4], method="linear")
  x = jax.random.normal(jax.random.key(2), (3, 16))
  loss = lambda t: jnp.sum(peftjax.lift(lambda q, x: x @ q["attn"]["q_proj"]["kernel"])(t, x) ** 2)
  trainable, frozen = peftjax.split(merged)
  g = jax.grad(lambda t: loss(peftjax.combine(t, frozen)))(trainable)["attn"]["q_proj"]["kernel"]
  node = merged["attn"]["q_proj"]["kernel"]
  ga, gb = jax.grad(lambda a, b: jnp.sum((x @ (node.w + a @ b)) ** 2), argnums=(0, 1))(node.a,
                                                                                     node.b)
  np.testing.assert_allclose(g.a, ga, rtol=1e-4)
  np.testing.assert_allclose(g.b, gb, rtol=1e-4)


def _hf_model(torch, kernels):
  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      for n, k in kernels.items():
        lin = torch.nn.Linear(k.shape[0], k.shape[1], bias=False)
        lin.weight.data = torch.tensor(np.asarray(k, np.float32).T.copy())
        setattr(self, n, lin)
  return M()


def test_parity_with_hf_peft_add_weighted_adapter(monkeypatch):
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  from peft.utils import merge_utils
  ks = jax.random.split(jax.random.key(5), 2)
  params = {"q_proj": {"kernel": jax.random.normal(ks[0], (16, 12))},
            "v_proj": {"kernel": jax.random.normal(ks[1], (10, 14))}}
  names = list(params)
  ours = {"x": _trained(params, 4, 8, 1), "y": _trained(params, 4, 4, 2),
          "z": _trained(params, 2, 6, 3)}                     # z: another rank, for cat / svd
  pm = peft.get_peft_model(_hf_model(torch, {n: params[n]["kernel"] for n in names}),
                           peft.LoraConfig(r=4, lora_alpha=8, target_modules=names),
                           adapter_name="x")
  pm.add_adapter("y", peft.LoraConfig(r=4, lora_alpha=4, target_modules=names))
  pm.add_adapter("z", peft.LoraConfig(r=2, lora_alpha=6, target_modules=names))
  layers = {n: getattr(pm.base_model.model, n) for n in names}
  candidates = []                         # (torch-layout tensor, its DARE keep mask)
  for i_name, (ad, tree) in enumerate(ours.items()):
    for n in names:
      node = tree[n]["kernel"]
      layers[n].lora_A[ad].weight.data = torch.tensor(np.asarray(node.a).T.copy())
      layers[n].lora_B[ad].weight.data = torch.tensor(np.asarray(node.b).T.copy())
      assert np.isclose(layers[n].scaling[ad], node.scale)

  def register_masks(order, method):
    candidates.clear()
    if not method.startswith("dare"):
      return
    drawn = merging.dare_masks({k: ours[k] for k in order}, method=method, density=0.5, key=KEY)
    for i, ad in enumerate(order):
      for n in names:
        node, masks = ours[ad][n]["kernel"], drawn[f"{n}/kernel"][i]
        for part, t in (("a", node.a), ("b", node.b), ("delta", node.delta())):
          if part in masks:
            candidates.append((np.asarray(t).T, np.asarray(masks[part]).T))

  def same_mask_pruning(tensor, density, rescale):   # HF's random_pruning with our masks
    x = tensor.detach().numpy()
    hits = [m for t, m in candidates if t.shape == x.shape and np.allclose(t, x, atol=1e-5)]
    assert len(hits) == 1
    out = tensor * torch.tensor(hits[0], dtype=tensor.dtype)
    return out / density if rescale else out
  monkeypatch.setattr(merge_utils, "random_pruning", same_mask_pruning)

  for method in ["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]:
    order = ["x", "z"] if method in ("cat", "svd") else ["x", "y"]
    register_masks(order, method)
    weights = [0.7, -0.4]
    new = f"m_{method}"
    pm.add_weighted_adapter(order, weights, new, combination_type=method, density=0.5,
                            majority_sign_method="total")
    mine = peftjax.merge_adapters({k: ours[k] for k in order}, weights, method=method,
                                  density=0.5, key=KEY)
    for n in names:
      node = mine[n]["kernel"]
      a_hf = layers[n].lora_A[new].weight.detach().numpy().T
      b_hf = layers[n].lora_B[new].weight.detach().numpy().T
      assert layers[n].scaling[new] == node.scale == 1.0 and a_hf.shape == node.a.shape
      if method.endswith("svd"):          # singular vectors up to sign: compare the products
        np.testing.assert_allclose(node.a @ node.b, a_hf @ b_hf, atol=1e-4, err_msg=method)
      else:
        np.testing.assert_allclose(node.a, a_hf, atol=1e-5, err_msg=f"{method} {n} A")
        np.testing.assert_allclose(node.b, b_hf, atol=1e-5, err_msg=f"{method} {n} B")


def test_bad_input():
  params = _base()
  x, y = _trained(params, 4, 8, 1), _trained(params, 2, 2, 2)
  m = lambda *a, **k: peftjax.merge_adapters(*a, **k)
  # NumPy weights and densities are numbers too
  np_w = m({"x": x, "y": _trained(params, 4, 2, 2)}, np.array([0.5, 0.5], np.float32),
           method="ties", density=np.float32(0.5))
  assert np_w["attn"]["q_proj"]["kernel"].rank == 4
  with pytest.raises(ValueError, match="non-empty"):
    m({}, [])
  with pytest.raises(ValueError, match=r"2 weights for 1 adapters"):
    m({"x": x}, [1.0, 2.0])
  with pytest.raises(ValueError, match=r"weights are for \['x', 'z'\], adapters are \['x', 'y'\]"):
    m({"x": x, "y": y}, {"x": 1.0, "z": 1.0})
  with pytest.raises(ValueError, match="the weight of 'y' must be a finite number, got nan"):
    m({"x": x, "y": y}, [1.0, float("nan")])
  with pytest.raises(ValueError, match="unknown method 'mean'"):
    m({"x": x, "y": y}, [1.0, 1.0], method="mean")
  with pytest.raises(ValueError, match="method 'ties' needs density in"):
    m({"x": x, "y": y}, [1.0, 1.0], method="ties")
  with pytest.raises(ValueError, match="density must be > 0"):
    m({"x": x, "y": y}, [1.0, 1.0], method="dare_linear", density=0.0, key=KEY)
  with pytest.raises(ValueError, match="draws random masks: pass key="):
    m({"x": x, "y": y}, [1.0, 1.0], method="dare_ties", density=0.5)
  with pytest.raises(ValueError, match="majority_sign_method must be"):
    m({"x": x, "y": y}, [1.0, 1.0], method="ties", density=0.5, majority_sign_method="vote")
  with pytest.raises(ValueError, match=r"method 'linear' needs equal ranks, but "
                                       r"attn/(o|q)_proj/kernel has \{'x': 4, 'y': 2\}"):
    m({"x": x, "y": y}, [1.0, 1.0], method="linear")
  with pytest.raises(ValueError, match=r"svd_rank=13 is larger than attn/(o|q)_proj/kernel allows"):
    m({"x": x, "y": y}, [1.0, 1.0], method="svd", svd_rank=13)
  with pytest.raises(ValueError, match="svd_rank must be a positive integer"):
    m({"x": x, "y": y}, [1.0, 1.0], method="svd", svd_rank=0)
  fewer = peftjax.lora.apply(params, rank=4, targets=["q_proj"])
  with pytest.raises(ValueError, match="adapter 'y' has no LoRA at attn/o_proj/kernel"):
    m({"x": x, "y": fewer}, [1.0, 1.0], method="cat")
  with pytest.raises(ValueError, match="adapter 'y' has LoRA at attn/o_proj/kernel, adapter 'x' "
                                       "has not"):
    m({"x": fewer, "y": x}, [1.0, 1.0], method="cat")
  other = dict(params, attn=dict(params["attn"], q_proj={"kernel": jnp.zeros((16, 10))}))
  with pytest.raises(ValueError, match=r"attn/q_proj/kernel is \[16, 10\].*in adapter 'y' but "
                                       r"\[16, 12\]"):
    m({"x": x, "y": _trained(other, 4, 8, 2)}, [1.0, 1.0], method="cat")
  ia3 = peftjax.ia3.apply(params, targets=["q_proj"])
  with pytest.raises(TypeError, match="adapter 'y' has a IA3Weight at attn/q_proj/kernel"):
    m({"x": x, "y": ia3}, [1.0, 1.0], method="cat")
  with pytest.raises(ValueError, match="method 'ties' draws no masks"):
    merging.dare_masks({"x": x}, method="ties", density=0.5, key=KEY)
  with pytest.raises(ValueError, match="holds no LoRA node"):
    m({"x": params}, [1.0], method="linear")
