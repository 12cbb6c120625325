"""Kernels shipped with convert-fp8, for GPU machines that cannot reach the Hub."""
