import os

# Keep XLA from grabbing every core per test worker, and make results reproducible.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def _share_compiled_programs():
  """One persistent XLA compilation cache for this test run: both xdist workers and every
  subprocess the tests start (``peftjax train``/``serve``/``generate``, the 2-process runs) read
  the programs the others compiled instead of compiling them again. Compiling dominates the suite
  (a tiny CPU program takes ~25 ms to compile and ~5 ms to load); measured in the commit that
  added this. The directory is new for every run: the first process to import this file (xdist's
  controller, or the only process) names it after its pid, the workers and subprocesses inherit it
  through the environment, and the controller removes it at the end, so no run reuses another's
  programs. ``PEFTJAX_TEST_NO_COMPILE_CACHE=1`` turns it off."""
  if os.environ.get("PEFTJAX_TEST_NO_COMPILE_CACHE") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"peftjax-tests-xla-cache-{os.getpid()}")
  os.environ["PEFTJAX_TEST_OWNS_COMPILE_CACHE"] = "1"
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_compiled_programs()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
  """The controller (not an xdist worker) removes this run's compilation cache."""
  import shutil
  if os.environ.get("PEFTJAX_TEST_OWNS_COMPILE_CACHE") and not hasattr(session.config,
                                                                       "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def rng():
  return jax.random.key(0)


#: Test modules that run with ``jax_numpy_dtype_promotion="strict"`` and
#: ``jax_numpy_rank_promotion="raise"``, as equinox's tests do: the node, ``lift``, method and
#: model code must cast explicitly (f32 adapters on bf16 bases, int codes, masks) and broadcast
#: explicitly (a bias or scale ``[d]`` against ``[..., d]`` is reshaped first). A test that steps an optax optimizer (Adam's bias correction raises a Python float to
#: an int32 count) or runs a Flax test model mixing parameter and compute dtypes opts out with
#: ``@pytest.mark.standard_promotion``.
STRICT_MODULES = {
    "test_node_contract", "test_lora", "test_qlora", "test_variants", "test_multi", "test_lift",
    "test_quant", "test_ia3", "test_adapters", "test_prefix", "test_prompt", "test_partition",
    "test_diff_pruning", "test_bitfit", "test_partial", "test_lora_init", "test_merging",
}


def pytest_collection_modifyitems(config, items):
  """``@pytest.mark.newest_only``: a slow test whose subject is not the interpreter runs once, in
  the newest-Python suite (``make test-newest``), so the Python 3.11 suite stays under 10 minutes
  on 2 cores. The newest suite runs it with the newest jax."""
  import sys
  if sys.version_info >= (3, 12):
    return
  skip = pytest.mark.skip(reason="slow and not about the interpreter: runs once, in the "
                                 "newest-Python suite (make test-newest)")
  for item in items:
    if item.get_closest_marker("newest_only") is not None:
      item.add_marker(skip)


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
  strict = (request.module.__name__.rsplit(".", 1)[-1] in STRICT_MODULES
            and request.node.get_closest_marker("standard_promotion") is None)
  if not strict:
    yield
    return
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield
