"""Triton kernels of sparsetrain, installed as ``sparsetrain.kernels``. Importing this imports Triton."""
