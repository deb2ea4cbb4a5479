"""The trainer: exact resume from checkpoints, dp/fsdp sharding, TensorBoard, tasks' forward hook,
resumable loaders and user data files."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax import data as data_lib
from peftjax import tasks
from peftjax.train import TrainConfig, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def next_token_loss(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def _model(p, ids):
  """A small dict model (compiles in a blink): embed -> 2 dense layers -> vocab."""
  x = p["embed"]["embedding"][ids]
  for name in ("layers_0", "layers_1"):
    x = x + jnp.tanh(x @ p[name]["up_proj"]["kernel"]) @ p[name]["down_proj"]["kernel"]
  return x @ p["lm_head"]["kernel"]


@functools.lru_cache(maxsize=None)
def _setup(seed=0):
  """One tree and one loss for every test, so the trainer compiles its step once."""
  k = iter(jax.random.split(jax.random.key(seed), 8))
  n = lambda *shape: 0.3 * jax.random.normal(next(k), shape)
  params = {"embed": {"embedding": n(32, 16)}, "lm_head": {"kernel": n(16, 32)},
            **{f"layers_{i}": {"up_proj": {"kernel": n(16, 32)}, "down_proj": {"kernel": n(32, 16)}}
               for i in range(2)}}
  tuned = peftjax.lora.apply(params, rank=2, targets=r".*_proj/kernel", key=jax.random.key(1))
  fwd = peftjax.lift(_model)

  def loss(tree, batch, key):
    return next_token_loss(fwd(tree, batch["input_ids"]), batch["input_ids"]), {}
  tokens = np.random.default_rng(0).integers(0, 32, 600)
  return tuned, loss, tokens


def _loader(tokens):
  return data_lib.LMLoader(tokens, seq_len=8, batch_size=4, seed=3)


def _cfg(**kw):
  return TrainConfig(**{**dict(steps=6, learning_rate=1e-2, warmup_steps=2, progress=False,
                               log_every=1), **kw})


class _Stop(Exception):
  pass


def _trainable(tree):
  return jax.tree.leaves(peftjax.split(tree)[0])


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
  tuned, loss, tokens = _setup()
  ref = train(loss, tuned, _loader(tokens), _cfg())

  def stop_at_4(state, metrics):
    if int(state.step) == 4:
      raise _Stop
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(_Stop):
    train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=ckpt, save_every=3), on_step=stop_at_4)
  # step 3 was saved; a fresh loader resumes at the saved position
  res = train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=ckpt, save_every=3))
  assert res.start_step == 3
  assert [h["step"] for h in res.history if "loss" in h] == [4, 5, 6]
  for a, b in zip(_trainable(ref.params), _trainable(res.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  ref_losses = {h["step"]: h["loss"] for h in ref.history if "loss" in h}
  for h in res.history:
    if "loss" in h:
      assert h["loss"] == pytest.approx(ref_losses[h["step"]], rel=1e-6)
  # the last step is saved too: running again trains nothing and returns the same tree
  again = train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=ckpt, save_every=3))
  assert again.start_step == 6 and not [h for h in again.history if "loss" in h]
  for a, b in zip(_trainable(ref.params), _trainable(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the trainer's checkpoints are peftjax.train.checkpoint's (io.checkpoint's name is an alias)
  from peftjax.io.checkpoint import TrainCheckpointer as old_name
  from peftjax.train.checkpoint import Checkpoint, TrainCheckpointer
  assert old_name is TrainCheckpointer
  with TrainCheckpointer(ckpt) as c:
    saved = c.restore(tuned)
  assert isinstance(saved, Checkpoint) and saved.step == 6 and saved.opt_state is None
  for a, b in zip(_trainable(ref.params), _trainable(saved.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _truncate(directory: pathlib.Path):
  """Cuts every array data file under ``directory`` to half its size (a disk full mid-write)."""
  files = [f for f in directory.rglob("*") if f.is_file() and f.parent.name == "d"]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(f.stat().st_size // 2)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_and_the_resumed_run_is_bit_identical(tmp_path, sig):
  import signal
  from peftjax.train import TrainInterrupted
  from peftjax.train.checkpoint import TrainCheckpointer
  tuned, loss, tokens = _setup()
  ref = train(loss, tuned, _loader(tokens), _cfg())
  signum = getattr(signal, sig)
  # what the handlers were before (SIG_IGN for SIGINT where the suite runs as a background job)
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

  def kill_at_4(state, metrics):
    if int(state.step) == 4:
      os.kill(os.getpid(), signum)  # arrives mid-run; the trainer finishes the step first
  ckpt = tmp_path / "ckpt"
  with pytest.raises(TrainInterrupted) as e:
    train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=str(ckpt), save_every=100,
                                              handle_signals=True), on_step=kill_at_4)
  assert (e.value.signum, e.value.step, e.value.checkpoint) == (signum, 4, ckpt / "4")
  assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
  with TrainCheckpointer(ckpt) as c:
    assert c.all_steps() == [4]  # save_every=100: only the interrupted step was saved
  res = train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=str(ckpt), save_every=100))
  assert res.start_step == 4
  for a, b in zip(_trainable(ref.params), _trainable(res.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_walks_back_past_a_checkpoint_that_does_not_read(tmp_path, capsys):
  from peftjax.io.checkpoint import CorruptCheckpoint
  from peftjax.train.checkpoint import TrainCheckpointer
  tuned, loss, tokens = _setup()
  ref = train(loss, tuned, _loader(tokens), _cfg())
  ckpt = tmp_path / "ckpt"
  train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=str(ckpt), save_every=2, steps=6,
                                           keep_checkpoints=3))
  _truncate(ckpt / "6")
  with TrainCheckpointer(ckpt) as c, pytest.raises(CorruptCheckpoint, match=r"6: the training "
                                                    r"state does not read completely"):
    c.restore(tuned, step=6)
  capsys.readouterr()
  res = train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=str(ckpt), save_every=2))
  err = capsys.readouterr().err
  assert res.start_step == 4 and "does not read completely" in err and \
      f"resuming from step 4 ({ckpt / '4'})" in err, err
  assert "Event loop is closed" not in err
  assert (ckpt / "6.corrupt").is_dir()  # set aside, not deleted; the rerun saved a new step 6
  with TrainCheckpointer(ckpt) as c:
    assert c.all_steps()[-1] == 6
  for a, b in zip(_trainable(ref.params), _trainable(res.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_a_plain_iterator_skips_the_consumed_batches(tmp_path):
  tuned, loss, tokens = _setup()
  batches = [{"input_ids": tokens[i * 36:(i + 1) * 36].reshape(4, 9)} for i in range(12)]
  ref = train(loss, tuned, iter(batches), _cfg())
  ckpt = str(tmp_path / "c")

  def stop(state, metrics):
    if int(state.step) == 5:
      raise _Stop
  with pytest.raises(_Stop):
    train(loss, tuned, iter(batches), _cfg(checkpoint_dir=ckpt, save_every=4), on_step=stop)
  res = train(loss, tuned, iter(batches), _cfg(checkpoint_dir=ckpt, save_every=4))
  assert res.start_step == 4
  # a checkpoint of a loader's position needs a loader to restore it
  with pytest.raises(ValueError, match="the data iterator has no restore"):
    with_loader = str(tmp_path / "l")
    train(loss, tuned, _loader(tokens), _cfg(checkpoint_dir=with_loader, save_every=6))
    train(loss, tuned, iter(batches), _cfg(checkpoint_dir=with_loader, save_every=6))
  for a, b in zip(_trainable(ref.params), _trainable(res.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_config_errors():
  with pytest.raises(ValueError, match="sharding: mesh 'tp': expected axis=size pairs"):
    TrainConfig(sharding="tp")
  with pytest.raises(ValueError, match="mesh 'data=2,tensor=0': tensor must be a positive"):
    TrainConfig(sharding="data=2,tensor=0")
  with pytest.raises(ValueError, match="mesh 'data=-1,fsdp=-1': at most one axis may be -1"):
    TrainConfig(sharding="data=-1,fsdp=-1")
  with pytest.raises(ValueError, match="sharding must be 'dp', 'fsdp', a mesh"):
    TrainConfig(sharding=4)
  tuned, loss, tokens = _setup()   # one device here: a mesh of 2 does not fit
  with pytest.raises(ValueError, match=r"sharding 'tensor=2': mesh .* needs 2 devices, have 1"):
    train(loss, tuned, _loader(tokens), _cfg(sharding="tensor=2"))
  with pytest.raises(ValueError, match="save_every must be a positive int, got 0"):
    TrainConfig(save_every=0)
  with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
    TrainConfig(steps=0)


def test_tensorboard_scalars_when_a_writer_is_importable(tmp_path, monkeypatch):
  calls = []

  class Writer:
    def __init__(self, logdir):
      calls.append(("init", logdir))

    def add_scalar(self, tag, value, step):
      calls.append((tag, value, step))

    def close(self):
      calls.append(("close",))
  monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=Writer))
  tuned, loss, tokens = _setup()
  train(loss, tuned, _loader(tokens), _cfg(out_dir=str(tmp_path)))
  assert calls[0] == ("init", str(tmp_path)) and calls[-1] == ("close",)
  assert [c[2] for c in calls if c[0] == "train/loss"] == [1, 2, 3, 4, 5, 6]
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 6


def test_no_tensorboard_is_silent(tmp_path, monkeypatch):
  import importlib.util
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("tensorboard", "tensorflow") else
                      real(name, *a))
  tuned, loss, tokens = _setup()
  train(loss, tuned, _loader(tokens), _cfg(out_dir=str(tmp_path)))
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


_SHARDED = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.path.insert(0, sys.argv[1])
  import test_train as t
  from peftjax.train import train
  assert len(jax.devices()) == 4
  out = {}
  for mode in ("dp", "fsdp", "data=1,fsdp=2,tensor=2"):
    tuned, loss, tokens = t._setup()
    res = train(loss, tuned, t._loader(tokens), t._cfg(sharding=mode))
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(res.params)
             if isinstance(x.sharding, jax.sharding.NamedSharding)}
    out[mode] = {"losses": [h["loss"] for h in res.history if "loss" in h],
                 "sharded": any("fsdp" in s for s in specs),
                 # the up projections' [16, 32] kernels: the shape of each device's piece
                 "pieces": sorted({x.addressable_shards[0].data.shape for x in
                                   jax.tree.leaves(res.params) if x.shape == (16, 32)})}
  print("RESULT" + json.dumps(out))
""")


@pytest.mark.newest_only   # not about the interpreter: the 3.11 suite is over budget
def test_dp_fsdp_and_a_tensor_mesh_match_one_device():
  tuned, loss, tokens = _setup()
  ref = [h["loss"] for h in train(loss, tuned, _loader(tokens), _cfg()).history if "loss" in h]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED, str(ROOT / "tests")], env=env,
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  for mode in out:
    np.testing.assert_allclose(out[mode]["losses"], ref, rtol=1e-5, err_msg=mode)
  assert out["fsdp"]["sharded"] and not out["dp"]["sharded"]
  # dp: whole; fsdp: rows over 4 devices; the mesh: rows over fsdp=2, columns over tensor=2
  assert [out[m]["pieces"] for m in out] == [[[16, 32]], [[4, 32]], [[8, 16]]], out


# ------------------------------------------------------------------------------------------------
# tasks: one forward that methods wrap
# ------------------------------------------------------------------------------------------------

def _lm_task(model, params, forward=None):
  tokens = np.random.default_rng(0).integers(0, 32, 200)
  loader = data_lib.LMLoader(tokens, seq_len=6, batch_size=2, seed=0)
  return tasks.Task("lm", model, params, None, loader, loader.epoch_iter,
                    forward or tasks.base_forward(model), tasks._lm_objective)


def test_task_adapt_forward_prepare_and_penalty():
  # (prompt/prefix forwards through Task.adapt run in test_cli's training runs)
  tuned, loss, tokens = _setup()
  params = peftjax.merge(tuned)
  task = _lm_task(None, params, forward=lambda tree, ids: peftjax.lift(_model)(tree, ids))
  batch = jax.tree.map(jnp.asarray, next(task.train_loader))
  tree = peftjax.diff_pruning.apply(params, targets=r".*_proj/kernel")
  seen = []

  def prepare(t, key):
    seen.append(key)
    return peftjax.diff_pruning.set_key(t, key)
  t = task.adapt(prepare=prepare, penalty=lambda t: 2.0 * peftjax.diff_pruning.penalty(t))
  loss, metrics = jax.jit(t.loss_fn)(tree, batch, jax.random.key(0))
  plain = jax.jit(task.loss_fn)(tree, batch, None)[0]
  pen = 2.0 * peftjax.diff_pruning.penalty(tree)
  assert seen and float(metrics["penalty"]) == pytest.approx(float(pen), rel=1e-4)
  assert float(loss) == pytest.approx(float(plain + pen), rel=1e-2)  # gate noise moves it a bit


# ------------------------------------------------------------------------------------------------
# loaders and data files
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lm", "classification"])
def test_loader_state_restore(kind):
  def make():
    if kind == "lm":
      return data_lib.LMLoader(np.arange(200), seq_len=4, batch_size=3, seed=1)
    ids = [[1] * (1 + i % 7) for i in range(30)]
    return data_lib.ClassificationLoader(ids, np.arange(30) % 2, batch_size=4, buckets=(4, 8),
                                         seed=1)
  a = make()
  for _ in range(9):  # crosses an epoch boundary
    next(a)
  pos = json.loads(json.dumps(a.state()))
  want = [next(a) for _ in range(5)]
  b = make()
  b.restore(pos)
  got = [next(b) for _ in range(5)]
  for x, y in zip(want, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(ValueError, match="a loader position is"):
    b.restore({"epoch": 1})


def test_read_labeled_files(tmp_path):
  (tmp_path / "a.tsv").write_text("sentence\tsentiment\ngreat\tpos\nawful\tneg\n")
  assert data_lib.read_labeled(tmp_path / "a.tsv", "sentence", "sentiment") == (
      ["great", "awful"], ["pos", "neg"])
  (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": 0}\n')
  texts, labels = data_lib.read_labeled(tmp_path / "b.jsonl")
  ids, names = data_lib.encode_labels(labels)
  assert texts == ["x", "y"] and ids.tolist() == [1, 0] and names == ["0", "1"]
  with pytest.raises(ValueError, match=r"no column 'review' \(--text-column\); the columns are: "
                                       r"sentence, sentiment"):
    data_lib.read_labeled(tmp_path / "a.tsv", "review", "sentiment")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data_lib.read_labeled(tmp_path / "missing.csv")
  with pytest.raises(ValueError, match="unknown data file type '.parquet'"):
    data_lib.read_labeled(tmp_path / "x.parquet")
  (tmp_path / "c.jsonl").write_text('{"text": "x", "label": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r"c.jsonl:2: not a JSON line"):
    data_lib.read_labeled(tmp_path / "c.jsonl")
  (tmp_path / "d.csv").write_text("text,label\nfine,\n")
  with pytest.raises(ValueError, match=r"d.csv:2: missing 'text' or 'label'"):
    data_lib.read_labeled(tmp_path / "d.csv")
  with pytest.raises(ValueError, match="label 'maybe' is not one of the labels"):
    data_lib.encode_labels(["maybe"], ["neg", "pos"])
  with pytest.raises(ValueError, match="integer labels must be >= 0"):
    data_lib.encode_labels(["-1", "2"])


def test_heldout_split_is_seeded():
  a, b = data_lib.heldout_split(50, 0.1, seed=3)
  assert len(b) == 5 and not set(a) & set(b)
  assert b.tolist() == data_lib.heldout_split(50, 0.1, seed=3)[1].tolist()
  assert b.tolist() != data_lib.heldout_split(50, 0.1, seed=4)[1].tolist()
  with pytest.raises(ValueError, match="too few"):
    data_lib.heldout_split(1, 0.5)
