"""Benchmarks of batch norm in JAX, Flax and PyTorch against a measured roofline.

Run ``python -m benchmarks --quick`` (a few minutes) or ``python -m benchmarks``
(the full suite) from the repository root; ``--help`` lists the options.
"""
