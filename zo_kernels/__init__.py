"""zo_kernels: fused zeroth-order noise kernels and ZO optimizers (MeZO, MeZO-SVRG).

    import zo_kernels
    zo_kernels.noise_axpy_(params, keys=[k], alphas=[mu])    # θ += μ z(k), one pass
    zo_kernels.noise_adam_(params, m, v, [k], [c], lr=1e-4, step=t)   # Adam with g = c z(k), one pass
    zo_kernels.lowrank_noise_axpy_(params, [ku], kv, [mu], rank=2)   # θ += μ U Vᵀ (LOZO), one pass
    zo_kernels.available_backends()                          # what runs here
"""
from . import noise
from ._register import register_all as _register_all
from .adam import noise_adam_
from .backends import available_backends, backend_status, last_backend
from .lowrank import lowrank_noise_axpy_
from .ops import noise_, noise_axpy_

__version__ = "0.1.0"
__all__ = ["noise", "noise_", "noise_axpy_", "noise_adam_", "lowrank_noise_axpy_", "available_backends",
           "backend_status", "last_backend"]

_register_all()
