"""The kernels at run time, each check in a fresh Python process.

Determinism: the same bits whatever the number of threads (XLA's pool,
sized by the CPUs the process may run on, or ``JAXBN_KERNEL_THREADS``) and
whatever instruction set runs (``JAXBN_KERNEL_ISA``). The fallback: with
``JAXBN_DISABLE_KERNELS=1``, or without the compiled module, jaxbn runs on
its XLA path and says why.
"""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaxbn import _kernels as kernels
from tests import _environment

# A forward and backward pass of several layouts with enough entries for
# many tasks: prints the threads the kernels ran on and a digest of all bits.
DIGEST = """
import hashlib, os, sys
if os.environ.get("ONE_CPU"):  # XLA sizes its intra-op pool by the CPUs we may use
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
import jax, jax.numpy as jnp, numpy as np
from jaxbn import _kernels as kernels

def step(x, scale, bias, kept, mask):
  axes = tuple(i for i in range(x.ndim) if i not in kept)
  xc = x.astype(jnp.float32)
  first = tuple(slice(None) if i in kept else slice(0, 1) for i in range(x.ndim))
  shift = jax.lax.stop_gradient(xc[first])
  s1, s2 = kernels.shifted_sums(axes, xc, x, shift, mask)
  n = jnp.sum(jnp.broadcast_to(mask, x.shape), axes, keepdims=True, dtype=jnp.float32)
  delta = s1 / n
  a = jax.lax.rsqrt((s2 - s1 * delta) / n + 1e-5) * scale.reshape(shift.shape)
  b = bias.reshape(shift.shape) - delta * a
  return kernels.shifted_affine_act("relu", 0.0, xc, x, shift, a, b, None)

digest = hashlib.sha256()
rng = np.random.default_rng(0)
cases = (((64, 14, 14, 48), (3,), jnp.float32), ((16, 24, 30, 30), (1,), jnp.bfloat16),
         ((300, 1000), (1,), jnp.float16))
for shape, kept, dtype in cases:
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, dtype)
  features = tuple(shape[i] for i in kept)
  scale, bias = jnp.ones(features), jnp.zeros(features)
  mask = jnp.asarray(rng.uniform(size=shape) > 0.2)
  dz = jnp.asarray(rng.standard_normal(shape), dtype)
  @jax.jit
  def forward_and_backward(x, scale, bias, mask, dz):
    z, vjp = jax.vjp(lambda *p: step(*p, kept, mask), x, scale, bias)
    return z, *vjp(dz)
  for leaf in forward_and_backward(x, scale, bias, mask, dz):
    digest.update(np.asarray(leaf).tobytes())
print(kernels.available(), kernels._library._load()[0].threads_used(), digest.hexdigest())
"""


def run_python(code, **env):
  """Runs ``code`` in a fresh interpreter with ``env`` added; returns its stdout and stderr.

  One host device: several would size XLA's intra-op pool apart from the CPUs.
  """
  result = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], env=_environment.one_device(**env),
      capture_output=True,
      text=True, timeout=300, check=False,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout, result.stderr


@pytest.mark.skipif(not kernels.available(), reason=f"kernels not loaded: {kernels.reason()}")
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_same_bits_whatever_the_threads_and_instruction_set():
  runs = {
      "default": {},
      "one cpu": {"ONE_CPU": "1"},
      "1 thread": {"JAXBN_KERNEL_THREADS": "1"},
      "5 threads": {"JAXBN_KERNEL_THREADS": "5"},
      "baseline isa": {"JAXBN_KERNEL_ISA": "baseline", "JAXBN_KERNEL_THREADS": "3"},
  }
  with ThreadPoolExecutor(2) as pool:
    outputs = pool.map(lambda env: run_python(DIGEST, **env)[0].split(), runs.values())
  results = dict(zip(runs, outputs, strict=True))
  assert {r[0] for r in results.values()} == {"True"}
  threads = {name: int(r[1]) for name, r in results.items()}
  assert threads["one cpu"] == threads["1 thread"] == 1 and threads["5 threads"] == 5, threads
  assert len({r[2] for r in results.values()}) == 1, results


FALLBACK = """
import functools, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
if "{block}":  # as if the module had not been built
  sys.modules["jaxbn._kernels._ffi"] = None
import jax, jax.numpy as jnp, numpy as np
import jaxbn
from jaxbn import _activation, _fused
from jaxbn import _kernels as kernels

x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 4)), jnp.bfloat16)
xc, shift = x.astype(jnp.float32), jnp.full((1, 1, 4), 0.5)
a, b = jnp.full((1, 1, 4), 2.0), jnp.ones((1, 1, 4))

def both(pieces, x):
  s1, s2 = pieces[0]((0, 1), x.astype(jnp.float32), x, shift, None)
  return s1, s2, pieces[1]("relu", 0.0, x.astype(jnp.float32), x, shift, a, b, None)

ours = functools.partial(both, (kernels.shifted_sums, kernels.shifted_affine_act))
fused = functools.partial(both, (_fused.shifted_sums, _activation.shifted_affine_act))
for got, want in zip(jax.jit(ours)(x), jax.jit(fused)(x)):
  np.testing.assert_array_equal(got, want)
assert "jaxbn_" not in jax.jit(ours).lower(x).compile().as_text()
print(jaxbn.kernels_available(), kernels.reason())
"""


def test_disabled_kernels_run_on_the_xla_path():
  out, err = run_python(FALLBACK.format(block=""), JAXBN_DISABLE_KERNELS="1")
  assert out.startswith("False disabled by the environment variable JAXBN_DISABLE_KERNELS=1")
  assert "jaxbn" not in err  # asked for: no message


def test_missing_module_runs_on_the_xla_path_and_says_so_once():
  out, err = run_python(FALLBACK.format(block="yes"), JAXBN_DISABLE_KERNELS="0")
  assert out.startswith("False the compiled module jaxbn._kernels._ffi was not built")
  assert err.count("jaxbn runs on its XLA path") == 1, err
  assert "install a C++17 compiler" in err
