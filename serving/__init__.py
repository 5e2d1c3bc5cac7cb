"""Serving: a built engine as a Triton Inference Server model repository entry."""

from miaotui.serving.triton import TritonOptions, TritonPackage, package_triton

__all__ = ["TritonOptions", "TritonPackage", "package_triton"]
