"""A tiny residual CNN twice: in PyTorch (NCHW) and in Flax linen with jaxbn (NHWC).

Both have a stem (conv, batch norm, ReLU), one residual block (conv, BN, ReLU,
conv, BN, skip, ReLU) and a linear head on the global average. Batch-norm
names follow the PyTorch ones under ``torch_to_linen``'s naming rule
(``layer1.0.bn1`` <-> ``layer1_0/bn1``); the block's second batch norm uses
PyTorch ``eps=1e-3, momentum=None`` so that non-default settings are carried.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn.linen

CHANNELS = 4
CLASSES = 3
BN2_EPS = 1e-3


class TorchBlock(torch.nn.Module):
  def __init__(self, c: int):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(c)
    self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(c, eps=BN2_EPS, momentum=None)

  def forward(self, x):
    h = torch.relu(self.bn1(self.conv1(x)))
    return torch.relu(self.bn2(self.conv2(h)) + x)


class TorchNet(torch.nn.Module):
  def __init__(self, c: int = CHANNELS, classes: int = CLASSES):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, c, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(c)
    self.layer1 = torch.nn.Sequential(TorchBlock(c))
    self.fc = torch.nn.Linear(c, classes)

  def forward(self, x):
    h = torch.relu(self.bn(self.conv(x)))
    return self.fc(self.layer1(h).mean((2, 3)))


def _conv(name):
  return nn.Conv(CHANNELS, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name=name)


class FlaxBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    # PyTorch momentum 0.1 is jaxbn's 0.9; bn2 averages cumulatively in PyTorch,
    # which matters only in training: in eval mode any momentum gives the same.
    h = _conv("conv1")(x)
    h = nn.relu(jaxbn.linen.BatchNorm(use_running_average=True, momentum=0.9, name="bn1")(h))
    h = _conv("conv2")(h)
    h = jaxbn.linen.BatchNorm(use_running_average=True, epsilon=BN2_EPS, name="bn2")(h)
    return nn.relu(h + x)


class FlaxNet(nn.Module):
  block_name: str = "layer1_0"

  @nn.compact
  def __call__(self, x):
    h = _conv("conv")(x)
    h = nn.relu(jaxbn.linen.BatchNorm(use_running_average=True, momentum=0.9, name="bn")(h))
    h = FlaxBlock(name=self.block_name)(h)
    return nn.Dense(CLASSES, name="fc")(h.mean((1, 2)))


def convs_and_dense_to_linen(state_dict, variables, block_name="layer1_0"):
  """Copies the convolutions and the head: OIHW kernels to HWIO, (out, in) to (in, out)."""
  params = variables["params"]
  block = params[block_name]
  kernels = {
      "conv.weight": (params["conv"], "kernel"),
      "layer1.0.conv1.weight": (block["conv1"], "kernel"),
      "layer1.0.conv2.weight": (block["conv2"], "kernel"),
  }
  for key, (module, name) in kernels.items():
    module[name] = jnp.asarray(state_dict[key].detach().numpy().transpose(2, 3, 1, 0))
  params["fc"]["kernel"] = jnp.asarray(state_dict["fc.weight"].detach().numpy().T)
  params["fc"]["bias"] = jnp.asarray(state_dict["fc.bias"].detach().numpy())
  return variables


def train_torch(model: TorchNet, steps: int, seed: int = 0) -> np.ndarray:
  """A few SGD steps in train mode, so the running statistics move; returns an eval batch."""
  generator = torch.Generator().manual_seed(seed)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
  model.train()
  for _ in range(steps):
    x = torch.randn(6, 3, 5, 5, generator=generator) * 2 + 1
    labels = torch.randint(0, CLASSES, (6,), generator=generator)
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  model.eval()
  return (torch.randn(5, 3, 5, 5, generator=generator) * 2 + 1).numpy()
