"""Multi-process training on JAX's distributed runtime, sharded QLoRA, checkpoints across hosts.

Two processes on this machine (a loopback coordinator on a free port, gloo CPU collectives, 2
CPU devices each) train LoRA and QLoRA under data parallelism and FSDP, and QLoRA on a (data=2,
tensor=2) mesh (tensor parallelism within each process, data across them); their losses and final
adapters must equal a single-process 4-device run and a 1-device run (f32, 1e-5). Checkpoints
written by the 2 processes restore in 1 process bit-identically, and the reverse. The node
sharding rules cover every registered node type, and QLoRA under FSDP on 8 devices really
splits the packed codes.

The workers are this file run as a script (``python tests/test_distributed.py MODE ...``); every
subprocess has a timeout and is killed in a ``finally``.
"""

import functools
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 150
STEPS = 4
# (method, TrainConfig.sharding); the mesh: tensor parallelism within each process, data across
CASES = [("lora", "dp"), ("lora", "fsdp"), ("qlora", "dp"), ("qlora", "fsdp"),
         ("qlora", "data=2,fsdp=1,tensor=2")]


# ------------------------------------------------------------------------------------------------
# the model, the data and one training run (shared by the workers and the 1-device reference)
# ------------------------------------------------------------------------------------------------

def _model(p, ids):
  """A small dict model: embed -> 1 residual MLP layer -> vocab."""
  x = p["embed"]["embedding"][ids]
  mlp = p["layers_0"]
  x = x + jnp.tanh(x @ mlp["up_proj"]["kernel"]) @ mlp["down_proj"]["kernel"]
  return x @ p["lm_head"]["kernel"]


def _base():
  k = iter(jax.random.split(jax.random.key(0), 8))
  n = lambda *shape: 0.3 * jax.random.normal(next(k), shape)
  return {"embed": {"embedding": n(32, 16)}, "lm_head": {"kernel": n(16, 32)},
          **{f"layers_{i}": {"up_proj": {"kernel": n(16, 32)}, "down_proj": {"kernel": n(32, 16)}}
             for i in range(1)}}


def _tuned(method: str):
  import peftjax
  kw = dict(rank=2, targets=r".*_proj/kernel", key=jax.random.key(1))
  if method == "qlora":
    return peftjax.qlora.apply(_base(), block_size=16, **kw)
  return peftjax.lora.apply(_base(), **kw)


@functools.lru_cache(maxsize=None)
def _loss():
  """One loss function for every run, so that the trainer reuses its compiled step."""
  import peftjax
  fwd = peftjax.lift(_model)

  def loss(tree, batch, key):
    ids = batch["input_ids"]
    logp = jax.nn.log_softmax(fwd(tree, ids)[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean(), {}
  return loss


def _loader(local_rows: bool = False):
  """The global batches (4 rows), or with ``local_rows`` only this process's rows of each."""
  from peftjax import data as data_lib
  tokens = np.random.default_rng(0).integers(0, 32, 600)
  kw = dict(process_index=jax.process_index(), process_count=jax.process_count()) \
      if local_rows else {}
  return data_lib.LMLoader(tokens, seq_len=8, batch_size=4, seed=3, **kw)


def _train(method, mode, ckpt_dir=None, local_rows=False):
  from peftjax.train import TrainConfig, train
  cfg = TrainConfig(steps=STEPS, learning_rate=1e-2, warmup_steps=1, progress=False, log_every=1,
                    sharding=mode, checkpoint_dir=ckpt_dir, save_every=2)
  return train(_loss(), _tuned(method), _loader(local_rows), cfg)


def train_resumed(method, ckpt_dir):
  """``_train`` resuming from ``ckpt_dir`` (on this process's devices)."""
  return _train(method, None, str(ckpt_dir))


def _adapter_leaves(tree) -> list:
  import peftjax
  from peftjax.train import distributed as dist
  return dist.gather(jax.tree.leaves(peftjax.split(tree)[0]))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
              XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=false "
                        f"--xla_force_host_platform_device_count={devices}")


def _launch(argvs: list, devices: int, log_dir: pathlib.Path, kill_when=None,
            signal_one=None) -> list:
  """Runs ``python this_file *argv`` for each argv at once and waits for all of them; after
  TIMEOUT_S, or as soon as one fails, the rest are killed; with ``kill_when`` (a path), all are
  killed (SIGKILL) 0.1-0.3 s after that file appears; with ``signal_one = (path, i, signum)``,
  process ``i`` alone gets ``signum`` once that file appears (and the wait goes on). Returns exit
  codes and log tails."""
  procs, logs, signalled = [], [], False
  try:
    for i, argv in enumerate(argvs):
      log = open(log_dir / f"worker{i}.log", "w")
      logs.append(log)
      procs.append(subprocess.Popen([sys.executable, __file__, *map(str, argv)], env=_env(devices),
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    # until all exit, one fails (the others would wait for it in a collective) or time is up
    while time.monotonic() < deadline and any(p.poll() is None for p in procs) and \
        not (any(p.poll() for p in procs) and signal_one is None):
      if signal_one is not None and not signalled and signal_one[0].exists():
        procs[signal_one[1]].send_signal(signal_one[2])
        signalled = True
      if kill_when is not None and kill_when.exists():
        time.sleep(0.1 + 0.2 * np.random.default_rng().random())
        break
      time.sleep(0.05 if kill_when is not None else 0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  return [(p.returncode, (log_dir / f"worker{i}.log").read_text()[-3000:])
          for i, p in enumerate(procs)]


# ------------------------------------------------------------------------------------------------
# workers
# ------------------------------------------------------------------------------------------------

def _worker_train(out: pathlib.Path, ref: pathlib.Path, pid: int, nproc: int, port: int):
  """Trains every case (2 processes or 1 process of 4 devices), saves checkpoints and adapters;
  with 2 processes also restores the 1-device run's adapters onto its FSDP mesh."""
  from peftjax.train import distributed as dist
  if nproc > 1:
    assert dist.initialize(f"127.0.0.1:{port}", nproc, pid) == (pid, nproc)
  import peftjax
  from peftjax.io.checkpoint import restore_adapter, save_adapter
  from peftjax.models.sharding import make_mesh, shard_params
  assert jax.device_count() == 4 and jax.local_device_count() == 4 // nproc
  result = {}
  # one process of 4 devices: FSDP and the mesh (its dp runs equal 1 device in test_train)
  for method, mode in CASES if nproc > 1 else [c for c in CASES if c[1] != "dp"]:
    name = f"{method}-{mode}"
    # training checkpoints: written by the FSDP runs of the 2 processes (sharded state)
    ckpt = str(out / f"ckpt-{name}") if nproc > 1 and mode == "fsdp" else None
    t0 = time.process_time()
    # the dp runs' loaders build only their process's rows; the fsdp runs' whole batches
    res = _train(method, mode, ckpt, local_rows=mode == "dp")
    print(f"{name}: trained in {time.process_time() - t0:.1f}s CPU", file=sys.stderr, flush=True)
    if nproc > 1:
      save_adapter(out / f"adapter-{name}", res.params)
    leaves = _adapter_leaves(res.params)
    entry = {"losses": [h["loss"] for h in res.history], "step": int(res.state.step)}
    if method == "qlora" and mode != "dp":
      codes = [x for x in jax.tree.leaves(res.params) if x.dtype == jnp.uint8 and x.ndim == 2]
      entry["codes_shard_bytes"] = [sorted({s.data.nbytes for s in x.addressable_shards})
                                    for x in codes]
      entry["codes_bytes"] = [x.nbytes for x in codes]
    if nproc > 1 and mode == "fsdp":
      # the reverse direction: an adapter saved by the 1-device run, restored onto this mesh
      template = shard_params(_tuned(method), make_mesh(fsdp=-1))
      back = restore_adapter(ref / f"adapter-{name}", template)
      entry["restored_specs"] = sorted({str(x.sharding.spec) for x in
                                        jax.tree.leaves(peftjax.split(back)[0])})
      np.savez(out / f"restored-{name}-{pid}.npz", *_adapter_leaves(back))
    if dist.is_main():
      np.savez(out / f"final-{name}.npz", *leaves)
    result[name] = entry
    if name == "lora-fsdp":
      kept = res
    print(f"{name}: done at {time.process_time():.1f}s CPU", file=sys.stderr, flush=True)
  dist.sync("done")
  if dist.is_main():
    (out / "result.json").write_text(json.dumps(result))
  if nproc > 1:
    _save_until_killed(out, kept)


def _save_until_killed(out: pathlib.Path, res):
  """Both processes save checkpoints of ``res`` (steps 6, 8, ...) back to back into a copy of
  the FSDP LoRA run's checkpoints; the test kills them (SIGKILL) while they do."""
  import shutil
  from peftjax.train import distributed as dist
  from peftjax.train.checkpoint import TrainCheckpointer
  kill_dir = out / "ckpt-kill"
  if dist.is_main():
    shutil.copytree(out / "ckpt-lora-fsdp", kill_dir)
  dist.sync("copied")
  with TrainCheckpointer(kill_dir, max_to_keep=None) as ckpt:
    for step in range(6, 400, 2):   # bounded: the test kills long before
      ckpt.save(step, res.params, res.state.opt_state, rng=res.state.key,
                data_position={"loader": {"epoch": 0, "index": step}})
      if step == 8 and dist.is_main():
        (out / "saving").write_text("")


def _worker_signalled(out: pathlib.Path, pid: int, nproc: int, port: int):
  """Trains LoRA under FSDP over the 2 processes with signal handling on, 400 slowed steps
  (bounded); process 1 announces step 3 (``started``), the test signals it alone. Each process
  writes where it stopped and exits as the CLI does (128 + the signal)."""
  from peftjax.train import TrainConfig, TrainInterrupted, train
  from peftjax.train import distributed as dist
  dist.initialize(f"127.0.0.1:{port}", nproc, pid)

  def on_step(state, host):
    if pid == 1 and int(state.step) == 3:
      (out / "started").write_text("")
    time.sleep(0.05)
  cfg = TrainConfig(steps=400, learning_rate=1e-2, warmup_steps=1, progress=False,
                    sharding="fsdp", checkpoint_dir=str(out / "ckpt"), save_every=1000,
                    handle_signals=True)
  try:
    train(_loss(), _tuned("lora"), _loader(), cfg, on_step=on_step)
  except TrainInterrupted as e:
    (out / f"stopped-{pid}.json").write_text(json.dumps(
        {"step": e.step, "signum": e.signum, "checkpoint": str(e.checkpoint)}))
    raise SystemExit(128 + e.signum) from None


def _npz(path) -> list:
  with np.load(path) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.newest_only
@pytest.mark.standard_promotion  # optax's Adam steps an int32 count with float powers
def test_two_processes_equal_one_and_four_devices_and_checkpoints_cross_process_counts(tmp_path):
  from peftjax.io.checkpoint import restore_adapter, save_adapter
  from peftjax.train.checkpoint import TrainCheckpointer
  ref_dir, two, four = tmp_path / "ref", tmp_path / "two", tmp_path / "four"
  for d in (ref_dir, two, four):
    d.mkdir()
  # the 1-device reference, in this process (dp and fsdp are the same run on one device)
  assert jax.device_count() == 1
  ref = {}
  for method in ("lora", "qlora"):
    res = _train(method, None)
    save_adapter(ref_dir / f"adapter-{method}-fsdp", res.params)
    for mode in {m for k, m in CASES if k == method}:
      ref[f"{method}-{mode}"] = ([h["loss"] for h in res.history], _adapter_leaves(res.params))
  port = _free_port()
  # the 2 processes are killed while they save checkpoints after their results are written
  runs = _launch([["train", two, ref_dir, 0, 2, port], ["train", two, ref_dir, 1, 2, port]],
                 devices=2, log_dir=two, kill_when=two / "saving")
  assert (two / "result.json").exists(), "\n".join(tail for _, tail in runs)
  runs = _launch([["train", four, ref_dir, 0, 1, 0]], devices=4, log_dir=four)
  for i, (rc, tail) in enumerate(runs):
    assert rc == 0, f"worker {i}:\n{tail}"
  out2 = json.loads((two / "result.json").read_text())
  out4 = json.loads((four / "result.json").read_text())
  for method, mode in CASES:
    name = f"{method}-{mode}"
    losses, leaves = ref[name]
    assert len(losses) == STEPS and out2[name]["step"] == STEPS and losses[-1] < losses[0]
    np.testing.assert_allclose(out2[name]["losses"], losses, rtol=1e-5, err_msg=name)
    final2 = _npz(two / f"final-{name}.npz")
    assert len(final2) == len(leaves) > 0
    for a, c in zip(final2, leaves):
      np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6, err_msg=name)
    if mode != "dp":
      np.testing.assert_allclose(out4[name]["losses"], losses, rtol=1e-5, err_msg=name)
      for b, c in zip(_npz(four / f"final-{name}.npz"), leaves):
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-6, err_msg=name)
    # saved by 2 processes, restored in 1: bit-identical to what the processes held
    tuned = _tuned(method)
    back = _adapter_leaves(restore_adapter(two / f"adapter-{name}", tuned))
    assert all(np.array_equal(x, y) for x, y in zip(back, final2)), name
    if mode != "fsdp":
      continue
    with TrainCheckpointer(two / f"ckpt-{name}") as ckpt:
      assert ckpt.all_steps() == [2, 4]
      state = ckpt.restore(tuned)
    assert state.step == STEPS and state.data_position == {"loader": {"epoch": 0, "index": 4}}
    assert all(np.array_equal(x, y) for x, y in zip(_adapter_leaves(state.params), final2))
    # the trainer resumes the 2 processes' checkpoint in 1 process (here: at its last step)
    res = train_resumed(method, two / f"ckpt-{name}")
    assert res.start_step == STEPS
    assert all(np.array_equal(x, y) for x, y in zip(_adapter_leaves(res.params), final2))
    # saved by 1 process, restored by 2 onto an FSDP mesh: bit-identical on both
    for pid in (0, 1):
      got = _npz(two / f"restored-{name}-{pid}.npz")
      assert all(np.array_equal(x, y) for x, y in zip(got, leaves)), (name, pid)
    assert any("fsdp" in s for s in out2[name]["restored_specs"]), out2[name]
  # an interrupted save of step 6 (orbax's temporary directory, never renamed, half written)
  ckpt_dir = two / "ckpt-lora-fsdp"
  partial = ckpt_dir / "6.orbax-checkpoint-tmp-1764650000"
  shutil.copytree(ckpt_dir / "4", partial)
  for f in sorted(p for p in partial.rglob("*") if p.is_file())[::2]:
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  with TrainCheckpointer(ckpt_dir) as ckpt:
    assert ckpt.all_steps() == [2, 4]                       # the leftover is no checkpoint
    state = ckpt.restore(_tuned("lora"))
  assert all(np.array_equal(x, y) for x, y in
             zip(_adapter_leaves(state.params), _npz(two / "final-lora-fsdp.npz")))
  # both processes killed (SIGKILL) during their saves: the newest committed step restores
  left = sorted(p.name for p in (two / "ckpt-kill").iterdir() if not p.name.isdigit())
  with TrainCheckpointer(two / "ckpt-kill") as ckpt:
    steps = ckpt.all_steps()
    # step 6 was committed before the save of 8 began (orbax finishes one save before the next)
    assert steps[:3] == [2, 4, 6], steps
    state = ckpt.restore(_tuned("lora"))
  assert state.step == steps[-1] and state.data_position["loader"]["index"] == steps[-1]
  assert all(np.array_equal(x, y) for x, y in
             zip(_adapter_leaves(state.params), _npz(two / "final-lora-fsdp.npz")))
  print("killed during saves; committed steps", steps, "left behind", left)
  # QLoRA under FSDP: every packed-code array is split over the 4 devices of the 2 processes
  q = out2["qlora-fsdp"]
  assert q["codes_bytes"] and all(s == [b // 4] for s, b in zip(q["codes_shard_bytes"],
                                                                 q["codes_bytes"])), q
  # and on the (data=2, tensor=2) mesh, split in halves along tensor, repeated along data
  q = out2["qlora-data=2,fsdp=1,tensor=2"]
  assert q["codes_bytes"] and all(s == [b // 2] for s, b in zip(q["codes_shard_bytes"],
                                                                 q["codes_bytes"])), q


def test_loaders_build_only_their_process_rows():
  from peftjax import data as data_lib
  tokens = np.random.default_rng(0).integers(0, 32, 600)
  ids = [list(range(1, 2 + i % 7)) for i in range(40)]
  labels = [i % 2 for i in range(40)]
  make = {"lm": lambda **kw: data_lib.LMLoader(tokens, seq_len=8, batch_size=4, seed=3, **kw),
          "cls": lambda **kw: data_lib.ClassificationLoader(ids, labels, batch_size=4, seed=1,
                                                            buckets=(4, 8), **kw)}
  for kind, new in make.items():
    whole, parts = new(), [new(process_index=i, process_count=2) for i in range(2)]
    for _ in range(12):   # past an epoch's end
      batch = next(whole)
      rows = [next(p) for p in parts]
      for k in batch:
        np.testing.assert_array_equal(np.concatenate([r[k] for r in rows]), batch[k],
                                      err_msg=kind)
      assert all(p.state() == whole.state() for p in parts)
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by process_count 3"):
      new(process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), got 2"):
      new(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="process_count must be a positive integer, got 0"):
      new(process_count=0)


def test_one_process_helpers_and_errors(monkeypatch, tmp_path):
  import peftjax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from peftjax.io.checkpoint import save_adapter
  from peftjax.models.sharding import make_mesh, put_global
  from peftjax.train import distributed as dist
  batch = {"x": np.arange(12).reshape(6, 2)}
  np.testing.assert_array_equal(dist.process_rows(batch, 1, 3)["x"], batch["x"][2:4])
  assert dist.process_rows(batch) is batch                   # one process: the batch itself
  with pytest.raises(ValueError, match="global batch size 6 is not divisible by the 4 processes"):
    dist.process_rows(batch, 0, 4)
  for k in dist.ENV.values():
    monkeypatch.delenv(k, raising=False)
  assert not dist.requested() and dist.requested(num_processes=2)
  with pytest.raises(ValueError, match="num_processes must be a positive integer, got 0"):
    dist.initialize("127.0.0.1:1", 0, 0)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
    dist.initialize("127.0.0.1:1", 2, 2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  assert dist.requested()
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    dist.initialize()
  assert not jax.distributed.is_initialized()
  # one process: put_global is device_put, replicate and sync change nothing, gather copies
  mesh = make_mesh(fsdp=-1)
  tree = {"w": jnp.ones((4, 2)), "key": jax.random.key(3)}
  put = put_global(tree, NamedSharding(mesh, P()))
  assert put["w"].sharding == NamedSharding(mesh, P()) and dist.replicate(tree) is tree
  dist.sync("nothing")
  np.testing.assert_array_equal(dist.gather(put)["key"], jax.random.key_data(tree["key"]))
  # never an empty adapter leaf (a [0]-shaped shard saved in place of a whole array)
  tuned = peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=2)
  node = tuned["d"]["kernel"]
  with pytest.raises(ValueError, match=r"adapter leaf d/kernel/a has shape \[8, 0\]"):
    save_adapter(tmp_path / "a", {"d": {"kernel": node.replace(a=jnp.zeros((8, 0)))}})
  assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------------
# sharding rules: every node type, and QLoRA's packed codes on 8 devices
# ------------------------------------------------------------------------------------------------

def _spec_axes(spec) -> list:
  return [tuple(() if e is None else (e,) if isinstance(e, str) else e) for e in spec]


def _check_spec(spec, shape, mesh_shape, where):
  from jax.sharding import PartitionSpec as P
  assert isinstance(spec, P), (where, spec)
  axes = _spec_axes(spec)
  assert len(axes) <= len(shape), (where, spec, shape)
  used = [a for e in axes for a in e]
  assert len(used) == len(set(used)), (where, spec)
  for e, dim in zip(axes, shape):
    assert dim % math.prod(mesh_shape[a] for a in e) == 0, (where, spec, shape)


def test_every_registered_node_type_gets_a_spec():
  """Each peftjax node type has a declared rule, and its example (and layer-stacked example) gets
  a valid PartitionSpec for every array, the kernel-shaped ones the kernel's own."""
  import peftjax
  from jax.sharding import PartitionSpec as P
  from peftjax._src.nodes import is_node, node_types
  from peftjax.models.sharding import NODE_RULES, param_specs
  from test_node_contract import EXAMPLES
  mesh_shape = {"data": 1, "fsdp": 2, "tensor": 2}
  types = {t for t, c in node_types().items() if c.__module__.startswith("peftjax.")}
  assert types <= set(NODE_RULES), sorted(types - set(NODE_RULES))
  assert types <= set(EXAMPLES)
  for tid in sorted(types):
    single, stacked = EXAMPLES[tid]()
    for node, tree in ((single, {"mlp": {"up_proj": {"kernel": single}}}),
                       (stacked, {"layers": {"mlp": {"up_proj": {"kernel": stacked}}}})):
      if node is None:
        continue
      specs = param_specs(tree, mesh_shape)
      spec_node = jax.tree.leaves(specs, is_leaf=is_node)[0]
      assert type(spec_node) is type(node)
      kernel_spec = param_specs({"k": {"mlp": {"up_proj": {"kernel": jnp.zeros(node.shape)}}}},
                                mesh_shape)["k"]["mlp"]["up_proj"]["kernel"]
      pairs = zip(jax.tree.leaves(node), jax.tree.leaves(spec_node, is_leaf=lambda x: isinstance(
          x, jax.sharding.PartitionSpec)))
      n = 0
      for x, spec in pairs:
        _check_spec(spec, x.shape, mesh_shape, tid)
        if tuple(x.shape) == tuple(node.shape) and len(node.shape) in (2, 3) and \
            node.shape[-1] == node.shape[-2] and tid not in ("prefix", "prefix_mlp"):
          assert spec == kernel_spec, (tid, spec, kernel_spec)
        n += 1
      assert n == len(jax.tree.leaves(node)) > 0, tid
  # a few that must follow the kernel [embed -> fsdp, mlp -> tensor]
  lora = param_specs({"mlp": {"up_proj": {"kernel": EXAMPLES["lora"]()[0]}}},
                     mesh_shape)["mlp"]["up_proj"]["kernel"]
  assert (lora.w, lora.a, lora.b) == (P("fsdp", "tensor"), P("fsdp"), P(None, "tensor"))
  q = peftjax.qlora.apply({"mlp": {"up_proj": {"kernel": jnp.ones((256, 128))}}}, rank=2,
                          targets=["up_proj"], block_size=64)
  qs = param_specs(q, mesh_shape)["mlp"]["up_proj"]["kernel"].w
  assert qs.codes == P("tensor", "fsdp") and qs.qscales == P("tensor")  # stored [out, in/2]
  # 4 blocks per row cannot split 8 ways: the rows do
  assert param_specs(q, {"fsdp": 8})["mlp"]["up_proj"]["kernel"].w.codes in (P("fsdp"),
                                                                            P("fsdp", None))


_QLORA_FSDP = """
import json, jax, jax.numpy as jnp, numpy as np, peftjax
from peftjax.models.sharding import make_mesh, shard_params
assert jax.device_count() == 8
mesh = make_mesh(fsdp=-1)
k = iter(jax.random.split(jax.random.key(0), 8))
n = lambda *s: 0.1 * jax.random.normal(next(k), s)
base = {"layers": {"self_attn": {"q_proj": {"kernel": n(2, 64, 64)}},
                   "mlp": {"up_proj": {"kernel": n(2, 64, 128)},
                           "down_proj": {"kernel": n(2, 128, 64)}}}}
tuned = peftjax.qlora.apply(base, rank=4, block_size=64, key=jax.random.key(1),
                            targets=r".*_proj/kernel")
sharded = shard_params(tuned, mesh)
out = {"codes": []}
for x in jax.tree.leaves(sharded):
  if x.dtype == jnp.uint8 and x.ndim == 3:   # packed codes [layers, out, in/2]
    out["codes"].append([x.nbytes, sorted({s.data.nbytes for s in x.addressable_shards}),
                         len(x.addressable_shards)])
x = jax.random.normal(jax.random.key(2), (8, 64))
fwd = peftjax.lift(lambda p, x: jnp.tanh(x @ p["layers"]["self_attn"]["q_proj"]["kernel"][0])
                   @ p["layers"]["mlp"]["up_proj"]["kernel"][1])
def loss(t, tree):
  return jnp.sum(fwd(peftjax.combine(t, tree), x) ** 2)
t0, f0 = peftjax.split(tuned)
t1, f1 = peftjax.split(sharded)
l0, g0 = jax.jit(jax.value_and_grad(loss))(t0, f0)
with jax.set_mesh(mesh):
  l1, g1 = jax.jit(jax.value_and_grad(loss))(t1, f1)
out["loss"] = [float(l0), float(l1)]
out["grad"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
out["gmax"] = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g0))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.standard_promotion
@pytest.mark.newest_only
@pytest.mark.standard_promotion
def test_a_signal_to_one_process_stops_all_at_one_step_with_their_checkpoint(tmp_path):
  """SIGTERM to process 1 only (a kill of one PID, one host preempted): both processes stop after
  the same step, save that step's checkpoint together and exit 143; before, process 0 went on
  alone and waited forever in the next step's collectives."""
  import signal
  from peftjax.train.checkpoint import TrainCheckpointer
  port = _free_port()
  runs = _launch([["signal", tmp_path, i, 2, port] for i in (0, 1)], devices=2, log_dir=tmp_path,
                 signal_one=(tmp_path / "started", 1, signal.SIGTERM))
  tails = "\n".join(tail for _, tail in runs)
  assert [rc for rc, _ in runs] == [128 + signal.SIGTERM] * 2, tails
  stops = [json.loads((tmp_path / f"stopped-{i}.json").read_text()) for i in (0, 1)]
  assert stops[0] == stops[1] and stops[0]["signum"] == signal.SIGTERM, stops
  step = stops[0]["step"]
  assert 3 <= step < 400, stops
  with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.all_steps() == [step]
    state = ckpt.restore(_tuned("lora"))
  assert state.step == step and state.data_position["loader"]["index"] == step


@pytest.mark.newest_only   # not about the interpreter: the 3.11 suite is over budget
def test_qlora_under_fsdp_shards_the_packed_codes_on_8_devices():
  proc = subprocess.run([sys.executable, "-c", _QLORA_FSDP], env=_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert len(out["codes"]) == 3
  for total, shard, count in out["codes"]:
    assert count == 8 and shard == [total // 8], out["codes"]   # per device: 1/8 of the bytes
  assert out["loss"][1] == pytest.approx(out["loss"][0], rel=1e-5)
  assert out["gmax"] > 0 and out["grad"] < 1e-5 * max(1.0, out["gmax"])


if __name__ == "__main__":
  mode, args = sys.argv[1], sys.argv[2:]
  if mode == "train":
    _worker_train(pathlib.Path(args[0]), pathlib.Path(args[1]), *map(int, args[2:5]))
  elif mode == "signal":
    _worker_signalled(pathlib.Path(args[0]), *map(int, args[1:4]))
  else:
    raise SystemExit(f"unknown mode {mode!r}")
