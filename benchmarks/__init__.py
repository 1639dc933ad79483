"""Benchmarks of batch norm in JAX, Flax and PyTorch against a measured roofline.

Run ``python -m benchmarks --quick`` (float32, fewer rounds; writes into
``~/.cache/jaxbn/benchmarks``) or ``python -m benchmarks`` (float32 and
bfloat16; writes into ``benchmarks/results``) from the repository root; the
README's Benchmarks section says how long each takes, ``--help`` lists the
options. ``shapes`` holds the input shapes, shared with the tests; ``resnet``
the training-step workload.
"""
