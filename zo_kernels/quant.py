"""A quantized base for zeroth-order fine-tuning: the linear layers of a model in 4-bit NF4
(bitsandbytes) or int8 weight-only (torchao), their integer codes frozen and their continuous
quantization scales exposed as ordinary fp32 `nn.Parameter`s that a ZO optimizer can perturb (QZO).

    from zo_kernels import quant
    quant.quantize_(model, "nf4")            # in place; the head ("classifier", "score", "lm_head") stays float
    scales = quant.scale_parameters(model)   # [(name, Parameter)], one fp32 scale per 64 weights (nf4) / per row (int8)
    codes = quant.integer_codes(model)       # {name: the uint8 / int8 code tensor}: never written by training

Pitfalls handled (docs/quantized.md):
  * bitsandbytes repacks a `Linear4bit`'s weight on the first no-grad eval forward on AVX512-BF16 CPUs,
    turning `absmax` into bf16, where a 1e-3 relative perturbation is lost: every `Linear4bit` here has
    `support_avx512bf16_for_cpu = False`, so `absmax` stays the fp32 tensor the optimizer writes.
  * double quantization (`compress_statistics`) would make `absmax` uint8: it is off.
  * nothing is created under `torch.inference_mode()` (inference tensors cannot be written in place later).
  * bitsandbytes tries to fetch a CPU kernel from the Hugging Face hub at import: HF_HUB_OFFLINE=1 is set
    (unless the caller set it) before the import.
  * a scale parameter is the very tensor the layer reads (`quant_state.absmax`, or a view sharing
    `weight.scale`'s storage), so an in-place noise pass on it moves the layer's output.  Quantize on
    the device the model will train on; after moving an nf4 model, call `relink(model)`.
bitsandbytes' 8-bit layer re-quantizes activations (its output does not move smoothly with a small
perturbation) and torchao's int4 configs need CUDA: neither is offered.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch

QUANT_KINDS = ("nf4", "int8")
SKIP = ("classifier", "score", "lm_head")        # heads stay float (and trainable)
NF4_BLOCK = 64                                   # weights per absmax scale
SCALE_NAME = "zo_scale"                          # the registered scale parameter of a quantized layer


class QuantError(RuntimeError):
    """A quantized base cannot be built here (a package missing, a layer that does not fit)."""


def _bnb():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import bitsandbytes
    except ImportError:
        raise QuantError("nf4 needs the 'bitsandbytes' package (pip install zo_kernels[quant])") from None
    return bitsandbytes


def _torchao():
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise QuantError("int8 needs the 'torchao' package (pip install zo_kernels[quant])") from None
    return Int8WeightOnlyConfig, quantize_


def available(kind: str) -> Tuple[bool, str]:
    """(True, "") when `kind` can be built here, else (False, why)."""
    try:
        _bnb() if kind == "nf4" else _torchao()
    except QuantError as e:
        return False, str(e)
    return True, ""


def _targets(net: torch.nn.Module, skip: Sequence[str]) -> List[Tuple[str, str]]:
    """(parent name, attribute) of every plain nn.Linear whose path has no part named in `skip`: names,
    not modules, so that each float layer is freed as soon as it is replaced (a 1.3B model would
    otherwise hold its fp32 weights until the last layer is quantized)."""
    out = []
    for name, mod in net.named_modules():
        if type(mod) is torch.nn.Linear and not any(part in skip for part in name.split(".")):
            out.append(tuple(name.rpartition(".")[::2]))
    return out


def _nf4_layer(lin: torch.nn.Linear):
    bnb = _bnb()

    class ZOLinear4bit(bnb.nn.Linear4bit):
        """Linear4bit whose state dict is its own tensors only (codes, bias, the fp32 scales): bitsandbytes'
        extra quant-state entries would make a strict load_state_dict of the same model fail, and
        the NF4 table they carry is a constant."""

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    dev = lin.weight.device
    w = lin.weight.detach()
    if lin.in_features % NF4_BLOCK:
        # bitsandbytes' CPU kernel finds a weight's absmax as row * (in_features // 64) + column // 64: a block
        # that spans two rows would be dequantized with the wrong scale (measured, 0.50.2)
        raise QuantError(f"nf4: a layer with {lin.in_features} inputs (not a multiple of {NF4_BLOCK}); "
                         f"every block of {NF4_BLOCK} weights must lie within one row")
    q = ZOLinear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                     compress_statistics=False, quant_type="nf4", device="meta")
    q.support_avx512bf16_for_cpu = False
    q.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, compress_statistics=False,
                                 quant_type="nf4", module=q)._quantize(dev)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.detach().float(), requires_grad=False)
    qs = q.weight.quant_state
    scale = torch.nn.Parameter(qs.absmax.contiguous(), requires_grad=False)
    qs.absmax = scale           # the tensor the layer reads is the parameter itself
    q.quant_state = qs
    q.register_parameter(SCALE_NAME, scale)
    return q


def _int8_layers(net: torch.nn.Module, layers: List[torch.nn.Linear]) -> None:
    config, quantize = _torchao()
    chosen = {id(m) for m in layers}
    quantize(net, config(), filter_fn=lambda m, fqn: id(m) in chosen)
    for lin in layers:
        s = lin.weight.scale
        if s.dtype != torch.float32 or not s.is_contiguous():
            raise QuantError(f"int8: torchao gave a {s.dtype} scale; expected contiguous float32")
        # A Parameter made from a tensor shares its storage: the noise pass on it writes weight.scale.
        lin.register_parameter(SCALE_NAME, torch.nn.Parameter(s, requires_grad=False))


def quantize_(net: torch.nn.Module, kind: str, skip: Sequence[str] = SKIP) -> int:
    """Quantize every nn.Linear of `net` (but the heads in `skip`) in place; returns how many.  The
    scales are registered as `<layer>.zo_scale` (requires_grad False: the caller chooses what trains)."""
    if kind not in QUANT_KINDS:
        raise QuantError(f"unknown quantization {kind!r}; choose from {', '.join(QUANT_KINDS)}")
    if torch.is_inference_mode_enabled():
        raise QuantError("quantize_ under torch.inference_mode() would make the scales inference tensors, "
                         "which training cannot write; call it outside")
    targets = _targets(net, skip)
    if not targets:
        raise QuantError(f"{kind}: the model has no nn.Linear layer to quantize")
    with torch.no_grad():
        if kind == "nf4":
            for parent, attr in targets:
                mod = net.get_submodule(parent)
                setattr(mod, attr, _nf4_layer(getattr(mod, attr)))
        else:
            _int8_layers(net, [getattr(net.get_submodule(p), a) for p, a in targets])
    return len(targets)


def relink(net: torch.nn.Module) -> None:
    """After `net.to(...)`: bitsandbytes moves a layer's quant state to a new tensor, apart from the
    `zo_scale` parameter; make the parameter the tensor the layer reads again."""
    for mod in net.modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if hasattr(mod, SCALE_NAME) and qs is not None:
            qs.absmax = getattr(mod, SCALE_NAME)
            mod.quant_state = qs


def scale_parameters(net: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every quantized layer's fp32 scales."""
    return [(n, p) for n, p in net.named_parameters() if n.rsplit(".", 1)[-1] == SCALE_NAME]


def integer_codes(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The integer codes of every quantized layer (bitsandbytes' packed uint8 / torchao's int8 qdata)."""
    out = {}
    for name, mod in net.named_modules():
        if hasattr(mod, SCALE_NAME):
            w = mod.weight
            out[name] = w.qdata if hasattr(w, "qdata") else w.data
    return out


def storage_bytes(net: torch.nn.Module) -> Dict[str, int]:
    """Bytes held by the model's tensors: integer codes, scales, and the float rest (embeddings, norms,
    biases, head, adapters), each storage counted once."""
    codes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in integer_codes(net).values()}
    scales = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for _, p in scale_parameters(net)}
    rest: Dict[int, int] = {}
    for t in list(net.parameters()) + list(net.buffers()):
        parts = [getattr(t, k) for k in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        for x in parts:
            st = x.untyped_storage()
            if st.data_ptr() not in codes and st.data_ptr() not in scales:
                rest[st.data_ptr()] = st.nbytes()
    return {"codes": sum(codes.values()), "scales": sum(scales.values()), "float": sum(rest.values())}
