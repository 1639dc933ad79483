"""Checkpoints: params and state survive Flax serialization and Orbax bit for bit,
and a checkpoint written by a model with ``flax.linen.BatchNorm`` restores into
the same model built with ``jaxbn.linen.BatchNorm``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import jaxbn
import jaxbn.linen


def _tree():
  """Params in two dtypes and a state that has been updated, so no value is trivial."""
  x = jax.random.normal(jax.random.key(0), (16, 3)) * 3 + 1
  params = {
      "scale": jnp.array([0.5, 1.25, -2.0], jnp.float32),
      "bias": jnp.array([1e-3, 3.0, -7.5], jnp.bfloat16),
  }
  _, state = jaxbn.batch_norm(x, jaxbn.init_state(3), **params, training=True, momentum=0.7)
  return {"params": params, "state": state}


def assert_bit_exact(restored, original):
  assert jax.tree.structure(restored) == jax.tree.structure(original)
  for path, a, b in zip(
      jax.tree_util.tree_leaves_with_path(original),
      jax.tree.leaves(restored),
      jax.tree.leaves(original),
      strict=True,
  ):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, path[0]
    assert a.tobytes() == b.tobytes(), path[0]


def test_flax_serialization_round_trip_is_bit_exact():
  tree = _tree()
  restored = serialization.from_bytes(tree, serialization.to_bytes(tree))
  assert isinstance(restored["state"], jaxbn.BatchNormState)
  assert_bit_exact(restored, tree)
  state_dict = serialization.msgpack_restore(
      serialization.msgpack_serialize(serialization.to_state_dict(tree))
  )
  assert_bit_exact(serialization.from_state_dict(tree, state_dict), tree)


def test_orbax_round_trip_is_bit_exact(tmp_path):
  tree = _tree()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  assert isinstance(restored["state"], jaxbn.BatchNormState)
  assert_bit_exact(restored, tree)


class Net(nn.Module):
  """Dense, batch norm, ReLU, dense: built with either batch-norm module."""

  norm: type[nn.BatchNorm]

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(5)(x)
    x = self.norm(use_running_average=not train, momentum=0.8, name="bn")(x)
    return nn.Dense(2)(nn.relu(x))


@pytest.mark.parametrize("save", ["flax.serialization", "orbax"])
def test_flax_linen_checkpoint_restores_into_jaxbn_linen(save, tmp_path):
  flax_net, jaxbn_net = Net(nn.BatchNorm), Net(jaxbn.linen.BatchNorm)
  x = jax.random.normal(jax.random.key(1), (8, 4)) * 2 + 3
  variables = flax_net.init(jax.random.key(2), x, train=False)
  for _ in range(2):  # move the running statistics away from their initial values
    _, updates = flax_net.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
  target = jaxbn_net.init(jax.random.key(3), x, train=False)
  if save == "orbax":
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp_path / "ckpt", variables)
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(tmp_path / "ckpt", target)
  else:
    restored = serialization.from_bytes(target, serialization.to_bytes(variables))
  assert_bit_exact(restored, variables)
  # Same variables, same outputs: eval mode, then one more training step.
  np.testing.assert_allclose(
      jaxbn_net.apply(restored, x, train=False), flax_net.apply(variables, x, train=False),
      rtol=1e-6, atol=1e-6,
  )
  y, updates = jaxbn_net.apply(restored, x, train=True, mutable=["batch_stats"])
  y_flax, updates_flax = flax_net.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(updates_flax), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
