"""Registering a Triton-backed function as a torch op, on the GPU and under Triton's interpreter.

On the GPU: ``torch.library.triton_op``, so ``torch.compile`` sees the kernel (launched from
Inductor's generated code; the fake implementation is the function itself run on fake tensors
through ``wrap_triton``). Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) an
interpreted kernel cannot be traced that way (``wrap_triton`` hands it back unwrapped), so the
op is an opaque ``custom_op`` with an explicit fake: it still compiles without a graph break,
and it runs the same kernel. There is no separate CPU implementation.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.library import triton_op

# Read before triton is imported: the interpreter is chosen at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def register(name: str, mutates_args: set[str], fake: Callable) -> Callable:
    """Decorator: ``fn`` (launching its kernels through ``wrap_triton``) as the op ``name``.

    ``fake`` gives the outputs' metadata; it is used only under the interpreter.
    """
    def wrap(fn: Callable) -> Callable:
        if not INTERPRET:
            return triton_op(name, mutates_args=mutates_args)(fn)
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        return op
    return wrap
