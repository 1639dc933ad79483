"""Benchmarks of batch norm in JAX, Flax and PyTorch against a measured roofline.

Run ``python -m benchmarks --quick`` (float32, about a minute on 2 cores) or
``python -m benchmarks`` (float32 and bfloat16) from the repository root;
``--help`` lists the options. ``shapes`` holds the input shapes, shared with
the tests.
"""
