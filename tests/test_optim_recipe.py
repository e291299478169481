"""The optimizer recipe (zo_kernels/optim/base.py's docstring and docs/optimizers.md) shows the code of
zo_kernels/optim/sign.py, its example: docstrings, type annotations and comments aside, the same class."""
import ast
import inspect
import pathlib
import textwrap

import pytest

import zo_kernels.optim.base as base
from zo_kernels.optim import sign

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _normalised(source: str) -> str:
    cls = next(n for n in ast.walk(ast.parse(textwrap.dedent(source))) if isinstance(n, ast.ClassDef))
    cls.body = [n for n in cls.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    for f in cls.body:
        f.returns = None
        for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs + [f.args.vararg, f.args.kwarg]:
            if a is not None:
                a.annotation = None
    return ast.dump(cls)


def _example(text: str) -> str:
    """The indented block that starts with `class ZOSGDSign(SPSAOptimizer):` in a docstring or page."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "class ZOSGDSign(SPSAOptimizer):")
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = [lines[start]]
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    return "\n".join(block)


@pytest.mark.parametrize("where", ["base.py", "docs/optimizers.md"])
def test_recipe_example_is_sign_py(where):
    text = base.__doc__ if where == "base.py" else (ROOT / where).read_text(encoding="utf-8")
    assert _normalised(_example(text)) == _normalised(inspect.getsource(sign.ZOSGDSign))


def test_a_different_example_is_caught():
    changed = _example(base.__doc__).replace("return [((d > 0) - (d < 0)) / q for d in ds]", "return [d / q for d in ds]")
    assert _normalised(changed) != _normalised(inspect.getsource(sign.ZOSGDSign))
