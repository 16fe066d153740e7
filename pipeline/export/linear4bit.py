"""``Linear4bit``: a W4A4 linear that runs on the integer kernels (``pipeline.export.kernels``).

``y = gemm_w4a4(quantize_act(H(x))) + b``: optional online Hadamard (R4), per-token asymmetric int4
activation codes, int4 x int4 GEMM with exact int32 accumulation and the dequant epilogue
(``pipeline.export.kernels`` module doc). On the CPU the GEMM runs on int8 dot products
(``kernels.gemm_w4a4_int8``: oneDNN's AMX / AVX-512 VNNI / AVX2 code, chosen at run time) where
``torch._int_mm`` works, else on the C++ int4 kernel; both give the same bits. It computes what ``online.QuantLinear`` fake-quantizes, with the
same activation codes, so the two agree to float rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from ..infra.errors import PipelineError
from ..rotation.hadamard import has_hadamard
from .kernels import check_k, cpu_int8_ready, cpu_ops, gemm_w4a4_int8, hadamard_base, is_hopper, ops_for
from ..surgery.online import OnlineAttention, QuantLinear


# At most this many tokens per call (decode), the C++ int4 kernel reads the packed weights directly (int8
# dot products on the nibbles, cuda_ext/cpu/w4a4_cpu.cpp int4_gemv); more, oneDNN int8. Llama-3-8B
# shapes, int8 / int4 time: 2.87-4.23x at M = 1, 1.33-1.68x at M = 16, 0.28-0.36x at M = 24 (past 16
# rows the kernel is its int16 loop). AMD EPYC, 2 threads, idle: python -m pipeline.tools.decode_crossover.
DECODE_ROWS = 16


class Linear4bit(nn.Module):
    """W4A4 linear: ``x (..., K)`` -> ``(..., N)`` in ``x``'s dtype, on the kernels of ``x``'s device
    (``kernels.ops_for``: the CUDA extension for CUDA tensors, the C++ CPU one otherwise); the
    activations are quantized from float32 and the epilogue is float32 on both, so both give the same
    codes and the same output bits.

    Buffers: ``qweight`` uint8 ``(N, K/2)`` packed codes, ``w_scale`` float32 ``(N,)``, ``w_sum``
    int32 ``(N,)`` (row sums of the codes, the zero-point term), ``bias`` float32 ``(N,)`` or None,
    ``had_base`` float32 ``(m, m)`` when the input is Hadamard-rotated online.
    """

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 clip_ratio: float = 1.0, rotate_input: bool = False) -> None:
        super().__init__()
        n, half_k = qweight.shape
        self.in_features, self.out_features = 2 * half_k, n
        check_k(self.in_features, "Linear4bit")
        self.clip_ratio = float(clip_ratio)
        self.rotate_input = rotate_input
        codes = cpu_ops().unpack_int4(qweight.detach().cpu().contiguous())
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("w_scale", w_scale.reshape(n).to(torch.float32).contiguous())
        self.register_buffer("w_sum", codes.to(torch.int32).sum(dim=1, dtype=torch.int32).to(qweight.device))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        if rotate_input and not has_hadamard(self.in_features):
            raise PipelineError(f"Linear4bit: no Hadamard construction for K={self.in_features}")
        self.register_buffer("had_base", hadamard_base(self.in_features) if rotate_input else None)
        self._codes_t: torch.Tensor | None = None
        self._codes_nk: torch.Tensor | None = None
        self.cpu_gemm = "auto"  # CPU GEMM: "auto" (int4 kernel up to DECODE_ROWS tokens, else int8 dot
        # products where torch._int_mm runs), "int8", "int4"

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_scale: torch.Tensor, clip_ratio: float = 1.0,
                   rotate_input: bool = False) -> "Linear4bit":
        """From a linear whose ``weight (N, K)`` lies on the symmetric 4-bit grid of ``weight_scale``
        (``(N,)`` or ``(N, 1)``, per output channel): ``weight / scale`` must be integers in [-8, 7]."""
        w = linear.weight.detach()
        n, k = w.shape
        check_k(k, "Linear4bit.from_float")
        if weight_scale.numel() != n:
            raise PipelineError(f"Linear4bit.from_float: weight_scale has {weight_scale.numel()} values for {n} "
                                "output channels: only per-output-channel scales are supported (quant.w_group_size=0)")
        scale = weight_scale.reshape(n, 1).to(torch.float64)
        ratio = w.to(torch.float64) / scale
        codes = torch.round(ratio)
        # a bf16/fp16 weight is codes * scale rounded to its dtype: up to 8 half-ulps off the grid
        tol = max(1e-3, 8 * torch.finfo(w.dtype).eps) if w.is_floating_point() else 1e-3
        if (ratio - codes).abs().max() > tol or codes.min() < -8 or codes.max() > 7:
            raise PipelineError("Linear4bit.from_float: the weight is not on the 4-bit grid of weight_scale")
        qweight = cpu_ops().pack_int4(codes.to(torch.int8).cpu()).to(w.device)
        return cls(qweight, weight_scale, linear.bias, clip_ratio, rotate_input)

    @classmethod
    def from_quant_linear(cls, module: nn.Module) -> "Linear4bit":
        """From a fused ``online.QuantLinear`` with 4-bit weights (``weight_scale`` set) and 4-bit activations."""
        act = module.act_quant
        if act is None or act.bits != 4 or module.weight_scale is None:
            bits = "off" if act is None else act.bits
            raise PipelineError(f"Linear4bit needs 4-bit quantized weights and 4-bit activations (activations: {bits})")
        return cls.from_float(module.linear, module.weight_scale, act.clip_ratio, module.rotate_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = ops_for(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        if x.is_cuda:  # Hadamard and quantization in one launch; the float32 epilogue as on the CPU
            if self.rotate_input:
                packed, scale, zero = ops.hadamard_quantize_act(x2, self.had_base, self.clip_ratio)
            else:
                packed, scale, zero = ops.quantize_act(x2, self.clip_ratio)
            if x2.shape[0] > DECODE_ROWS and self.out_features % 8 == 0 and is_hopper(x2):  # prefill, Hopper: CUTLASS int8 wgmma
                y = ops.gemm_int8_sm90(ops.unpack_int4(packed), scale, zero, self._weight_codes_nk(), self.w_scale,
                                       self.w_sum, out_dtype=torch.float32)
            elif x2.shape[0] <= DECODE_ROWS:  # decode: the split-K GEMV over the packed weights
                y = ops.gemv_w4a4(packed, scale, zero, self.qweight, self.w_scale, self.w_sum, out_dtype=torch.float32)
            else:
                y = ops.gemm_w4a4(packed, scale, zero, self.qweight, self.w_scale, self.w_sum, out_dtype=torch.float32)
        else:
            if self.rotate_input:
                x2 = ops.hadamard(x2, self.had_base)
            rows = x2.shape[0]
            if self.cpu_gemm == "int8" or (self.cpu_gemm == "auto" and rows > DECODE_ROWS and cpu_int8_ready()):
                codes, scale, zero = ops.quantize_act_int8(x2, self.clip_ratio)  # one int8 code per element
                y = gemm_w4a4_int8(codes, scale, zero, self._weight_codes_t(), self.w_scale, self.w_sum)
            else:
                packed, scale, zero = ops.quantize_act(x2, self.clip_ratio)
                y = ops.gemm_w4a4(packed, scale, zero, self.qweight, self.w_scale, self.w_sum)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _weight_codes_nk(self) -> torch.Tensor:
        """The weight codes as int8 ``(N, K)`` on the weights' GPU for Hopper's int8 GEMM: unpacked once, on
        first use (twice the packed bytes, half of bf16's; not in the state dict)."""
        if self._codes_nk is None or self._codes_nk.device != self.qweight.device:
            self._codes_nk = ops_for(self.qweight).unpack_int4(self.qweight.contiguous())
        return self._codes_nk

    def _weight_codes_t(self) -> torch.Tensor:
        """The weight codes as int8 ``(K, N)`` for the int8 path: unpacked once, on first use (twice the
        packed bytes, half of bf16's; not in the state dict)."""
        if self._codes_t is None or self._codes_t.device != self.qweight.device:
            self._codes_t = cpu_ops().unpack_int4(self.qweight.cpu().contiguous()).T.contiguous()
        return self._codes_t

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"clip_ratio={self.clip_ratio}, rotate_input={self.rotate_input}")


def use_kernels(model: nn.Module) -> int:
    """Replace every 4-bit ``QuantLinear`` of ``model`` by a ``Linear4bit``, and every ``OnlineAttention``
    (R3, KV quant) by a ``KernelOnlineAttention`` (same bits, C++ ops), in place; returns how many linears."""
    from .online_kernels import KernelOnlineAttention

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Linear4bit.from_quant_linear(module))
    online = [(name, m) for name, m in model.named_modules()
              if isinstance(m, OnlineAttention) and not isinstance(m, KernelOnlineAttention)]
    for name, module in online:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, KernelOnlineAttention.from_online(module))
    return len(targets)
