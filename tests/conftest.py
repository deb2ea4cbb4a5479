import os

# Keep XLA from grabbing every core per test worker, and make results reproducible.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


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
