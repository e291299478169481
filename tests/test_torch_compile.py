"""The custom op works inside torch.compile(fullgraph=True): schema and fake kernel are right."""
import pytest
import torch

import zo_kernels
from zo_kernels import noise as N

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_opcheck_schema_and_fake_kernel():
    p = [torch.randn(10, device=DEVICE), torch.randn(3, 5, device=DEVICE)]
    args = (p, [N.to_signed64(N.step_key(1, 2))], [0.5], 1.0, [], 0.0, "nearest", [0, 1], [0, 0], 0, "gaussian",
            [], "reference")
    torch.library.opcheck(torch.ops.zo_kernels.noise_axpy_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_function_calling_the_op_matches_eager():
    def step(w, b, x, key: int):
        zo_kernels.noise_axpy_([w, b], [key], [1e-2], backend="reference")
        return (x @ w + b).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    w0, b0, x = torch.randn(4, 3), torch.randn(3), torch.randn(2, 4)
    w1, b1 = w0.clone(), b0.clone()
    key = N.step_key(5, 6)
    out_c = compiled(w0, b0, x, key)
    out_e = step(w1, b1, x, key)
    assert torch.equal(w0, w1) and torch.equal(b0, b1)
    torch.testing.assert_close(out_c, out_e)


def test_lowrank_op_schema_and_fake_kernel():
    p = [torch.randn(10, device=DEVICE), torch.randn(3, 5, device=DEVICE)]
    key = N.to_signed64(N.step_key(1, 2))
    args = (p, [key], key, [0.5], [], 1.0, [], 0.0, [], 2, 2, "nearest", [0, 1], [0, 0], 0, "reference")
    torch.library.opcheck(torch.ops.zo_kernels.lowrank_noise_axpy_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_call_still_rejects_aliased_params():
    """The aliasing check runs inside the op, on the real tensors, so compiled code keeps it."""
    def step(w, v):
        zo_kernels.noise_axpy_([w, v], [1], [1e-2], backend="reference")
        return w.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    w = torch.randn(4, 3)
    before = w.clone()
    with pytest.raises(ValueError, match="share memory"):
        compiled(w, w)
    assert torch.equal(w, before)
