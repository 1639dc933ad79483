"""Loading the compiled kernels and registering them with XLA, once.

The kernels are the extension module ``jaxbn._kernels._ffi``, built by
``pip install`` when a C++17 compiler is present. Without it, or with
``JAXBN_DISABLE_KERNELS=1`` in the environment, every primitive lowers to its
plain-JAX reference (the XLA path) and ``available()`` is False, with
``reason()`` saying why.
"""

import functools
import importlib
import logging
import os
import re
from pathlib import Path

import jax

DISABLE_ENV = "JAXBN_DISABLE_KERNELS"
HOW_TO_GET_THEM = (
    "To get the kernels, install a C++17 compiler (g++ or clang++) and reinstall jaxbn "
    "(`pip install -e .` in a source checkout, or `pip install --force-reinstall --no-deps "
    "jaxbn`)."
)

_log = logging.getLogger("jaxbn")


@functools.cache
def _load() -> tuple[object | None, str]:
  """``(module, "")`` with the targets registered, or ``(None, why not)``."""
  if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
    return None, f"disabled by the environment variable {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
  try:
    _ffi = importlib.import_module("jaxbn._kernels._ffi")
  except ImportError as error:
    why = (
        "the compiled module jaxbn._kernels._ffi was not built (no C++17 compiler at install?)"
        if isinstance(error, ModuleNotFoundError)
        else f"the compiled module jaxbn._kernels._ffi does not load ({error})"
    )
    _log.warning("jaxbn runs on its XLA path: %s. %s", why, HOW_TO_GET_THEM)
    return None, why
  built, running = _ffi.ffi_api_version(), _runtime_ffi_api_version()
  if running is not None and (built[0] != running[0] or built[1] > running[1]):
    why = (
        f"the kernels were built against XLA FFI API {built}, newer than this jaxlib's "
        f"{running}"
    )
    _log.warning("jaxbn runs on its XLA path: %s. Reinstall jaxbn to rebuild them.", why)
    return None, why
  for name, capsule in _ffi.targets().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  return _ffi, ""


def _runtime_ffi_api_version() -> tuple[int, int] | None:
  """The XLA FFI API version of the installed jaxlib, read from its header."""
  try:
    header = Path(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h").read_text()
  except OSError:
    return None
  found = [re.search(rf"#define XLA_FFI_API_{part} (\d+)", header) for part in ("MAJOR", "MINOR")]
  if not all(found):
    return None
  return int(found[0].group(1)), int(found[1].group(1))


def available() -> bool:
  """Whether jaxbn's compiled CPU kernels are loaded.

  ``pip install`` builds them when it finds a C++17 compiler; without one,
  or with the environment variable ``JAXBN_DISABLE_KERNELS=1``, jaxbn runs
  on its XLA path (the same results, slower on CPU), and
  ``jaxbn._kernels.reason()`` says why.

  Examples:
    >>> import jaxbn
    >>> isinstance(jaxbn.kernels_available(), bool)
    True
  """
  return _load()[0] is not None


def reason() -> str:
  """Why the kernels are not available; empty when they are."""
  return _load()[1]


def isa() -> str | None:
  """The instruction set the kernels run with on this CPU (``avx512``, ``avx2``, ``baseline``)."""
  module = _load()[0]
  return None if module is None else module.isa()
