"""Triton interpreter (TRITON_INTERPRET=1, the CPU test mode) fixes for older Triton releases.

Triton 3.6's interpreter turns a scalar tensor into a Python int with `int(handle.data)`, where the
data of a scalar is a NumPy array of shape (1,); NumPy 2 refuses that conversion ("only 0-dimensional
arrays can be converted to Python scalars"), so any loop whose bound is a runtime scalar
(`for t in range(T)`) fails.  Triton 3.9 squeezes the array first.  This applies the same conversion
to the interpreter of releases that need it.  The compiled GPU path is untouched.
"""
from __future__ import annotations

import numpy as np


def _index_ok(interpreter) -> bool:
    """Whether the interpreter's scalar __index__ works here (probed on a stand-in class)."""
    import triton.language as tl

    class Probe:
        pass

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Probe, scope)
    try:
        t = Probe()
        t.handle = interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32)
        return range(t) == range(3)
    except TypeError:
        return False
    finally:
        scope.restore()


def fix_scalar_index() -> bool:
    """Patch the interpreter's scalar -> int conversion where it is broken; True if patched."""
    try:
        from triton.runtime import interpreter
        patch = interpreter._patch_lang_tensor
        if getattr(patch, "zo_fixed", False) or _index_ok(interpreter):
            return False
    except AttributeError:  # another interpreter layout: nothing known to fix
        return False

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.zo_fixed = True
    interpreter._patch_lang_tensor = patched
    return True
