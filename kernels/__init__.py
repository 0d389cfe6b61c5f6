"""Compute kernels. Each op has a plain-PyTorch twin that is its specification."""
