"""LoRA initializations from the base weight (PiSSA, OLoRA, LoftQ) and the PiSSA/OLoRA -> LoRA
conversion: identity at step 0, the formulas against NumPy, parity with HF PEFT's inits, LoftQ's
error reduction, gradients, the saved adapter on the original base in HF PEFT, bad input."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax import lora_init
from peftjax.lora import LoraWeight
from peftjax.quant import QuantizedWeight

FIX = Path(__file__).resolve().parent / "fixtures" / "hf_peft_tiny_llama"
X = jnp.asarray(np.random.RandomState(4).randn(5, 32), jnp.float32)


def _params(dtype=jnp.float32):
  """A 2-D kernel, a layer-stacked one and a DenseGeneral one ([d, heads, head_dim])."""
  rs = np.random.RandomState(3)
  return {
      "attn": {"q_proj": {"kernel": jnp.asarray(rs.randn(32, 24), dtype)},
               "o_proj": {"kernel": jnp.asarray(rs.randn(12, 2, 8), dtype)}},
      "layers": {"mlp": {"up_proj": {"kernel": jnp.asarray(rs.randn(2, 16, 24), dtype)}}},
  }


TARGETS = ["q_proj", "o_proj", "up_proj"]
PATHS = ["attn/q_proj/kernel", "attn/o_proj/kernel", "layers/mlp/up_proj/kernel"]


def _nodes(tree):
  return {p: x for p, x in peftjax._src.targeting.leaves_with_paths(tree)
          if isinstance(x, LoraWeight)}


def _kernels(tree):
  return dict(peftjax._src.targeting.leaves_with_paths(tree))


def _mat(x, node):
  """A kernel (or delta) as NumPy ``[L, K, N]`` (L = 1 for unstacked)."""
  x = np.asarray(x, np.float64)
  nb, ni = node.n_batch, node.n_in
  k = int(np.prod(x.shape[nb:nb + ni]))
  return x.reshape(-1, k, int(np.prod(x.shape[nb + ni:])))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_residual_plus_adapter_is_the_original(init):
  params = _params()
  tuned = peftjax.lora.apply(params, rank=4, alpha=12, targets=TARGETS, init=init)
  orig = _kernels(params)
  for p, node in _nodes(tuned).items():
    assert node.scale == 3.0 and node.rank == 4
    np.testing.assert_allclose(peftjax.merge(node), orig[p], atol=1e-5, err_msg=p)
    # the base really changed, by exactly the adapter's product
    assert float(jnp.abs(node.w - orig[p]).max()) > 0.1
    np.testing.assert_allclose(node.w + node.delta(), orig[p], atol=1e-5)
  # the model's output at step 0, lifted, with and without jit
  x = X
  f = lambda t, x: x @ t["attn"]["q_proj"]["kernel"]
  for fn in (peftjax.lift(f), jax.jit(peftjax.lift(f))):
    np.testing.assert_allclose(fn(tuned, x), f(params, x), atol=1e-4)


def test_pissa_and_olora_formulas_against_numpy():
  params = _params()
  orig = _kernels(params)
  s = 12 / 4
  pissa = _nodes(peftjax.lora.apply(params, rank=4, alpha=12, targets=TARGETS, init="pissa"))
  olora = _nodes(peftjax.lora.apply(params, rank=4, alpha=12, targets=TARGETS, init="olora"))
  for p in PATHS:
    node = pissa[p]
    w = _mat(orig[p], node)
    a = np.asarray(node.a, np.float64).reshape(w.shape[0], w.shape[1], 4)
    b = np.asarray(node.b, np.float64).reshape(w.shape[0], 4, w.shape[2])
    for l in range(w.shape[0]):                                     # one SVD per layer
      u, sv, vt = np.linalg.svd(w[l], full_matrices=False)
      np.testing.assert_allclose(s * a[l] @ b[l], (u[:, :4] * sv[:4]) @ vt[:4], atol=1e-4)
      # the scale convention: A = U_r sqrt(S_r / s), so |A_j| = sqrt(S_j / s)
      np.testing.assert_allclose(np.linalg.norm(a[l], axis=0), np.sqrt(sv[:4] / s), rtol=1e-4)
      np.testing.assert_allclose(np.abs(a[l] / np.linalg.norm(a[l], axis=0)), np.abs(u[:, :4]),
                                 atol=1e-4)
    node = olora[p]
    a = np.asarray(node.a, np.float64).reshape(w.shape[0], w.shape[1], 4)
    b = np.asarray(node.b, np.float64).reshape(w.shape[0], 4, w.shape[2])
    for l in range(w.shape[0]):
      q, r = np.linalg.qr(w[l].T)                        # W^T = Q R
      sign = np.sign(np.sum(b[l] * q[:, :4].T, axis=1))  # unique up to a sign per component
      np.testing.assert_allclose(b[l] * sign[:, None], q[:, :4].T, atol=1e-4)
      np.testing.assert_allclose(a[l] * sign, r[:4].T, atol=1e-4)
      np.testing.assert_allclose(b[l] @ b[l].T, np.eye(4), atol=1e-5)  # orthonormal B


def test_randomized_pissa_finds_the_principal_subspace():
  # a kernel with a clear spectral gap: rank-4 signal + small noise
  rs = np.random.RandomState(5)
  w = jnp.asarray(rs.randn(48, 4) @ rs.randn(4, 40) + 0.01 * rs.randn(48, 40), jnp.float32)
  full = peftjax.lora.apply({"q_proj": {"kernel": w}}, rank=4, init="pissa")["q_proj"]["kernel"]
  fast = peftjax.lora.apply({"q_proj": {"kernel": w}}, rank=4, init="pissa_niter_2",
                            key=jax.random.key(1))["q_proj"]["kernel"]
  np.testing.assert_allclose(fast.delta(), full.delta(), atol=2e-3)
  np.testing.assert_allclose(peftjax.merge(fast), w, atol=1e-5)
  other = peftjax.lora.apply({"q_proj": {"kernel": w}}, rank=4, init="pissa_niter_2",
                             key=jax.random.key(2))["q_proj"]["kernel"]
  assert not np.array_equal(np.asarray(other.a), np.asarray(fast.a))   # the key draws the sketch


def test_bf16_kernels():
  params = _params(jnp.bfloat16)
  tuned = peftjax.lora.apply(params, rank=4, targets=TARGETS, init="pissa")
  orig = _kernels(params)
  for p, node in _nodes(tuned).items():
    assert node.w.dtype == jnp.bfloat16 and node.a.dtype == jnp.bfloat16
    got = np.asarray(peftjax.merge(node), np.float32)
    ref = np.asarray(orig[p], np.float32)
    # bf16 rounding of the residual and of A, B: a few bf16 ulps of |W|
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max(), p
  f32 = peftjax.lora.apply(params, rank=4, targets=TARGETS, init="olora", dtype=jnp.float32)
  assert _nodes(f32)["attn/q_proj/kernel"].a.dtype == jnp.float32


def _hf_linears(torch, kernels):
  class M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      for n, k in kernels.items():
        lin = torch.nn.Linear(k.shape[0], k.shape[1], bias=False)
        lin.weight.data = torch.tensor(np.asarray(k, np.float32).T.copy())
        setattr(self, n, lin)
  return M()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_parity_with_hf_peft_init(init):
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  rs = np.random.RandomState(11)
  kernels = {"q_proj": rs.randn(32, 24).astype(np.float32),
             "v_proj": rs.randn(16, 40).astype(np.float32)}
  pm = peft.get_peft_model(_hf_linears(torch, kernels), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=list(kernels), init_lora_weights=init))
  tuned = peftjax.lora.apply({n: {"kernel": jnp.asarray(k)} for n, k in kernels.items()},
                             rank=4, alpha=8, targets=list(kernels), init=init)
  for n in kernels:
    layer = getattr(pm.base_model.model, n)
    a_hf = layer.lora_A["default"].weight.detach().numpy().T       # ours: a = lora_A^T
    b_hf = layer.lora_B["default"].weight.detach().numpy().T       # b = lora_B^T
    w_hf = layer.base_layer.weight.detach().numpy().T
    node = tuned[n]["kernel"]
    a, b = np.asarray(node.a), np.asarray(node.b)
    # singular / QR vectors are unique up to a sign per component: align, then compare
    sign = np.sign(np.sum(a * a_hf, axis=0))
    np.testing.assert_allclose(a * sign, a_hf, atol=1e-4, err_msg=n)
    np.testing.assert_allclose(b * sign[:, None], b_hf, atol=1e-4, err_msg=n)
    # QR agrees to f32 rounding; two f32 SVDs (of W and of W^T) to ~1e-6 of the top singular
    # value (here ~10), which the residual inherits
    np.testing.assert_allclose(np.asarray(node.w), w_hf, atol=1e-5 if init == "olora" else 5e-5,
                               err_msg=n)
    assert np.isclose(node.scale, layer.scaling["default"])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_gradients_flow_after_init(jit):
  params = _params()
  x = X
  f = lambda t: jnp.sum(jnp.tanh(x @ t["attn"]["q_proj"]["kernel"]) ** 2)
  for init in ("pissa", "olora"):
    tuned = peftjax.lora.apply(params, rank=4, alpha=8, targets=["q_proj"], init=init)
    trainable, frozen = peftjax.split(tuned)
    loss = lambda t: peftjax.lift(f)(peftjax.combine(t, frozen))
    grad = jax.jit(jax.grad(loss)) if jit else jax.grad(loss)
    g = grad(trainable)["attn"]["q_proj"]["kernel"]
    node = tuned["attn"]["q_proj"]["kernel"]
    ref = lambda a, b: jnp.sum(jnp.tanh(x @ (node.w + node.scale * a @ b)) ** 2)
    ga, gb = jax.grad(ref, argnums=(0, 1))(node.a, node.b)
    np.testing.assert_allclose(g.a, ga, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.b, gb, rtol=1e-4, atol=1e-4)
    # unlike B = 0 inits, both factors get a gradient at step 0
    assert float(jnp.abs(g.a).max()) > 1e-3 and float(jnp.abs(g.b).max()) > 1e-3


def test_loftq_lowers_the_quantization_error():
  # a weight-like kernel: a decaying spectrum plus a few outliers
  rs = np.random.RandomState(21)
  w = jnp.asarray(rs.randn(128, 16) @ rs.randn(16, 64) * 0.05 + rs.randn(128, 64) * 0.02,
                  jnp.float32)
  params = {"mlp": {"up_proj": {"kernel": w}}, "layers": {"mlp": {"down_proj": {
      "kernel": jnp.stack([w[:64].T * 2, w[64:].T])}}}}
  plain = peftjax.qlora.apply(params, rank=8, alpha=16)
  errs = {"qlora": lora_init.quantization_error(plain, params)["rel_error"]}
  for it in (1, 4):
    lq = peftjax.qlora.apply(params, rank=8, alpha=16, init="loftq", loftq_iter=it)
    node = lq["mlp"]["up_proj"]["kernel"]
    assert isinstance(node.w, QuantizedWeight) and node.w.format == "nf4"
    assert node.a.dtype == jnp.float32 and node.scale == 2.0
    errs[it] = lora_init.quantization_error(lq, params)["rel_error"]
  print(f"LoftQ: relative error ||W - (deq(Q) + s A B)|| / ||W||: QLoRA {errs['qlora']:.4f}, "
        f"LoftQ 1 iter {errs[1]:.4f} ({errs[1] / errs['qlora']:.2f}x), "
        f"4 iters {errs[4]:.4f} ({errs[4] / errs['qlora']:.2f}x)")
  # measured: 0.092 -> 0.072 (0.78x) after one iteration -> 0.065 (0.70x) after four
  assert errs[1] < 0.85 * errs["qlora"]
  assert errs[4] < 0.75 * errs["qlora"] and errs[4] < errs[1]
  # same quantization in both: with one iteration the base is QLoRA's own
  lq1 = peftjax.qlora.apply(params, rank=8, init="loftq")
  np.testing.assert_array_equal(lq1["mlp"]["up_proj"]["kernel"].w.codes,
                                plain["mlp"]["up_proj"]["kernel"].w.codes)
  # lora.apply(init="loftq") on plain kernels: NF4 by default, or as loftq_quant says
  int8 = peftjax.lora.apply(params, rank=8, targets=["up_proj"], init="loftq",
                            loftq_quant={"format": "int8", "block_size": None})
  assert int8["mlp"]["up_proj"]["kernel"].w.format == "int8"


def test_qpissa_quantizes_the_residual():
  params = _params()
  tuned = peftjax.qlora.apply(params, rank=4, targets=["q_proj", "up_proj"], init="pissa")
  for p, node in _nodes(tuned).items():
    assert isinstance(node.w, QuantizedWeight), p
  err = lora_init.quantization_error(tuned, params)["rel_error"]
  plain = lora_init.quantization_error(
      peftjax.qlora.apply(params, rank=4, targets=["q_proj", "up_proj"]), params)["rel_error"]
  assert err < plain    # the principal part stays in full precision (QPiSSA)


def _perturb(tree, scale=0.05):
  def f(path, x):
    if isinstance(x, LoraWeight):
      rs = np.random.RandomState(len(jax.tree_util.keystr(path)))
      return x.replace(a=x.a + jnp.asarray(scale * rs.randn(*x.a.shape), x.a.dtype),
                       b=x.b + jnp.asarray(scale * rs.randn(*x.b.shape), x.b.dtype))
    return x
  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=peftjax.is_node)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_convert_to_lora_applies_to_the_original_base(init):
  params = _params()
  initial = peftjax.lora.apply(params, rank=4, alpha=8, targets=TARGETS, init=init)
  tuned = _perturb(initial)                                   # "trained"
  for original in (params, None):
    conv = lora_init.convert_to_lora(tuned, initial, original)
    orig = _kernels(params)
    for p, node in _nodes(conv).items():
      assert node.rank == 8 and node.scale == 2.0
      if original is not None:
        assert node.w is orig[p]
      np.testing.assert_allclose(peftjax.merge(node), peftjax.merge(_nodes(tuned)[p]), atol=1e-5)


def test_pissa_adapter_saved_as_lora_loads_in_hf_peft_on_the_original_base(tmp_path):
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  import json
  import transformers
  from peftjax.io import from_pretrained
  from peftjax.io.hf import SafetensorsFile
  from peftjax.io.hf_peft import ADAPTER_CONFIG, save_hf_peft
  model, params, _ = from_pretrained(FIX / "base", scan_layers=True, tokenizer=False)
  ids = np.array(SafetensorsFile(FIX / "reference.safetensors").get("input_ids")).astype(np.int32)
  initial = peftjax.lora.apply(params, rank=4, alpha=8, targets=["q_proj", "v_proj"],
                               init="pissa")
  tuned = _perturb(initial, 0.2)
  fwd = jax.jit(peftjax.lift(model.apply))
  ours = np.asarray(fwd({"params": tuned}, ids))
  base = np.asarray(fwd({"params": params}, ids))
  conv = lora_init.convert_to_lora(tuned, initial, params)
  np.testing.assert_allclose(np.asarray(fwd({"params": conv}, ids)), ours, atol=1e-4)
  out = save_hf_peft(conv, tmp_path / "pissa_as_lora")
  cfg = json.loads((out / ADAPTER_CONFIG).read_text())
  assert cfg["r"] == 8 and cfg["lora_alpha"] == 16       # 2r and 2 alpha, as HF PEFT saves it
  hf = transformers.AutoModelForCausalLM.from_pretrained(FIX / "base", attn_implementation="eager")
  pm = peft.PeftModel.from_pretrained(hf, out).eval()
  with torch.no_grad():
    theirs = pm(input_ids=torch.tensor(ids)).logits.numpy()
  diff = np.abs(theirs - ours).max()
  print(f"PiSSA -> LoRA on the original base in HF PEFT: max |logits - peftjax| = {diff:.2e} "
        f"(the adapter moves logits by {np.abs(ours - base).max():.2f})")
  assert diff <= 1e-4 and np.abs(ours - base).max() > 0.05


def test_cli_option():
  m = peftjax.methods.get("lora")
  vals = m.option_values({"init": "pissa_niter_3", "loftq_iter": "2"})
  assert vals["init"] == "pissa_niter_3" and vals["loftq_iter"] == 2
  tree = m.build(_params(), {"init": "olora", "targets": ".*q_proj.*"})
  node = tree["attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(peftjax.merge(node), _params()["attn"]["q_proj"]["kernel"], atol=1e-5)
  with pytest.raises(ValueError, match="init='pissa_niter_0' is not supported"):
    m.option_values({"init": "pissa_niter_0"})
  assert peftjax.methods.get("qlora").option_values({"init": "loftq"})["init"] == "loftq"


def test_bad_input():
  params = _params()
  with pytest.raises(ValueError, match="init='svd' is not supported"):
    peftjax.lora.apply(params, rank=4, init="svd")
  with pytest.raises(ValueError, match="loftq_iter must be an integer >= 1, got 0"):
    peftjax.lora.apply(params, rank=4, targets=["q_proj"], init="loftq", loftq_iter=0)
  q = peftjax.quant.quantize(params, targets=["q_proj"])
  with pytest.raises(ValueError, match=r"init='pissa' needs the full-precision kernel at "
                                       r"attn/q_proj/kernel, but it is a QuantizedWeight"):
    peftjax.lora.apply(q, rank=4, targets=["q_proj"], init="pissa")
  with pytest.raises(ValueError, match="init='loftq' needs the full-precision kernel"):
    peftjax.qlora.apply(q, rank=4, init="loftq")
  a = peftjax.lora.apply(params, rank=4, targets=["q_proj"], init="pissa")
  b = peftjax.lora.apply(params, rank=4, targets=["q_proj", "o_proj"], init="pissa")
  with pytest.raises(ValueError, match="different LoRA kernels"):
    lora_init.convert_to_lora(b, a)
  c = peftjax.lora.apply(params, rank=2, targets=["q_proj"], init="pissa")
  with pytest.raises(ValueError, match=r"attn/q_proj/kernel has A \[32, 2\]"):
    lora_init.convert_to_lora(c, a)
  with pytest.raises(ValueError, match="no kernel at attn/q_proj/kernel"):
    lora_init.convert_to_lora(a, a, {"other": params["attn"]["o_proj"]})
  with pytest.raises(ValueError, match="rank=30 is larger than attn/q_proj/kernel allows"):
    peftjax.lora.apply(params, rank=30, targets=["q_proj"], init="pissa")
