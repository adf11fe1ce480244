"""Compile a Triton kernel ahead of time for a CUDA target (sm_80, sm_90) without a GPU: this
catches shape and type rules that TRITON_INTERPRET lets through."""

import os

AOT = """
import sys, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
module, kernel, cc = sys.argv[1], sys.argv[2], int(sys.argv[3])
fn = getattr(importlib.import_module(module), kernel)
pointers, constants = eval(sys.argv[4]), eval(sys.argv[5])
signature = {n: pointers.get(n) or ("constexpr" if n in constants else "fp32" if n == "scale" else "i32")
             for n in fn.arg_names}
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=GPUTarget("cuda", cc, 32))
assert "cubin" in compiled.asm and compiled.asm["ptx"]
"""


def compile_ahead_of_time(module: str, kernel: str, cc: int, pointers: dict, constants: str) -> None:
    """Compile for a CUDA target in a fresh process: the interpreter this file runs under would
    otherwise stand in for the compiler."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT, module, kernel, str(cc), repr(pointers), constants],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
