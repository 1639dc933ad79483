"""The environment of a fresh Python process that a test starts (a notebook kernel, a script)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_device(**extra: str) -> dict[str, str]:
  """This process's environment with one host CPU device and the source tree importable.

  conftest.py asks for 8 host devices; a user's process has one (several would
  also size XLA's intra-op pool apart from the CPUs).
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  env.update(extra)
  return env
