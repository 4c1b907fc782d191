"""When the ``torch.compile`` fast paths switch themselves on (optimizers and Bit layers)."""

from __future__ import annotations

import functools
import os
import shutil

import torch


@functools.cache
def compile_usable(device_type: str) -> bool:
    """Whether an automatic (``None``) fast-path choice compiles on ``device_type``: CUDA only,
    when a GPU is present, dynamo supports this Python and triton can build kernels for it."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    if not torch._dynamo.is_dynamo_supported():
        return False
    from torch.utils._triton import has_triton

    return has_triton()


@functools.cache
def cpu_compile_usable() -> bool:
    """Whether ``torch.compile`` can build CPU kernels here: dynamo supports this Python and a C++
    compiler is found (``$CXX``, else g++, c++ or clang++), which inductor needs on CPU."""
    if not torch._dynamo.is_dynamo_supported():
        return False
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(cxx) for cxx in candidates)
