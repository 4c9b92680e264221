"""HRR binding fused into one CUDA kernel (`hrr_bind.cu`): c = irfft(op(rfft(a))·rfft(b)) reading a and b once and
writing c once, where `torch.fft` makes three memory passes and complex intermediates (specs/vsa.md, "The fused
CUDA kernel").

Scope: CUDA float32 operands of the same shape with the last dimension D ∈ {512, 1024, 2048, 4096, 8192}
(`fused_bind_supported`); everything else keeps `optimized.vsa`'s torch.fft path. Gradients go through the same
kernel (the adjoint of a convolution is a correlation and vice versa). `MEMARCH_DISABLE_KERNELS=bind` switches
the kernel off.

Build: on first use nvcc (`$NVCC`, else `nvcc` on the PATH, else `$CUDA_HOME/bin/nvcc`) compiles `hrr_bind.cu`
for the device's compute capability into `$MEMARCH_CACHE_DIR` (as `cpu_scan.c`), named by a hash of the source,
the flags and the compiler; loaded with ctypes. Where nvcc is missing or the build fails, `unavailable_reason()`
says why and binding keeps its torch path.

On a machine without a GPU the same kernel source, compiled for the CPU by the C++ compiler with one thread per
CUDA thread (`hrr_bind_emulate.cpp`), runs CPU tensors through `fused_bind`: the tests check the kernel's indexing,
synchronisation and gradients in CI that way, as Triton's interpreter does for the Triton kernels.

Tolerances against the float64 reference: float32 1e-5 relative, as the torch.fft path (both are float32 FFTs
with twiddles rounded from float64).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from optimized.kernels import compile_library, eager, kernels_disabled

__all__ = ["SUPPORTED_DIMS", "default_values", "emulator_unavailable_reason", "fused_bind", "fused_bind_supported",
           "unavailable_reason"]

SOURCE = Path(__file__).with_name("hrr_bind.cu")
EMULATOR = Path(__file__).with_name("hrr_bind_emulate.cpp")
SUPPORTED_DIMS = (512, 1024, 2048, 4096, 8192)
# `values` below: values per thread and largest radix for every D (hrr_bind.cu's HRR_VALUES: 4, 8, 16 or 32), for
# `--op bind_sweep`; 0, the default, takes the kernel's own choice per D (`default_values`)


def _nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return shutil.which(os.environ["NVCC"])
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        found = shutil.which(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    return found


@functools.cache
def _library(capability: tuple[int, int], values: int = 0) -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel for one compute capability (and `values` per thread), or None and the reason it
    cannot be had (said once per process, as a warning: binding then runs torch.fft)."""
    library, reason = _build(capability, values)
    if library is None:
        warnings.warn(f"memarch: the fused CUDA bind kernel is unavailable ({reason}); bind/unbind use torch.fft",
                      RuntimeWarning, stacklevel=2)
    return library, reason


def _values_flag(values: int) -> list[str]:
    if values not in (0, 4, 8, 16, 32):
        raise ValueError(f"values per thread must be 4, 8, 16 or 32 (or 0: the kernel's choice), not {values}")
    return [f"-DHRR_VALUES={values}"] if values else []


def _build(capability: tuple[int, int], values: int) -> tuple[ctypes.CDLL | None, str]:
    nvcc = _nvcc()
    if nvcc is None:
        return None, "nvcc not found (set NVCC or CUDA_HOME, or put nvcc on the PATH)"
    arch = f"sm_{capability[0]}{capability[1]}"
    flags = ["-O3", "-std=c++17", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", *_values_flag(values)]
    library, reason = compile_library(nvcc, flags, SOURCE, f"hrr_bind-{arch}", timeout=300)
    if library is None:
        return None, reason
    ptr = ctypes.c_void_p
    # a, b, c, rows, D, conj_a, twiddles, stream
    library.memarch_hrr_bind.argtypes = [ptr, ptr, ptr, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ptr, ptr]
    library.memarch_hrr_bind.restype = ctypes.c_int
    return library, ""


@functools.cache
def _emulator(values: int = 0) -> tuple[ctypes.CDLL | None, str]:
    """`hrr_bind_emulate.cpp` (the kernel compiled for the CPU, a thread per CUDA thread), or None and why not."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++ or clang++)"
    flags = ["-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", *_values_flag(values)]
    library, reason = compile_library(compiler, flags, EMULATOR, "hrr_bind_emulate", depends=(SOURCE,))
    if library is None:
        return None, reason
    ptr = ctypes.c_void_p
    library.memarch_hrr_bind_emulated.argtypes = [ptr, ptr, ptr, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ptr]
    library.memarch_hrr_bind_emulated.restype = ctypes.c_int
    return library, ""


def default_values(dim: int) -> int:
    """Values per thread of the kernel's default build at D = `dim` (0 for a D it does not take, or where neither
    the CUDA build nor the emulator builds)."""
    library = _library(torch.cuda.get_device_capability())[0] if torch.cuda.is_available() else None
    library = library or _emulator()[0]
    return int(library.memarch_hrr_values(dim)) if library is not None else 0


def emulator_unavailable_reason() -> str:
    """Why `fused_bind` cannot run CPU tensors through the emulated kernel here ("" when it can)."""
    return _emulator()[1]


@eager
def unavailable_reason(device: torch.device | None = None) -> str:
    """Why the fused kernel cannot run on `device` (default: the current CUDA device); "" when it can."""
    if {"bind", "all"} & kernels_disabled():
        return "switched off by MEMARCH_DISABLE_KERNELS"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _library(torch.cuda.get_device_capability(device))[1]


def fused_bind_supported(a: Tensor, b: Tensor) -> bool:
    """Whether `fused_bind` takes these operands: CUDA float32, one shape, D in SUPPORTED_DIMS, and the kernel
    builds here (checked last: CPU tensors never reach the build)."""
    return (a.is_cuda and b.device == a.device and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.shape == b.shape and a.ndim >= 1 and a.shape[-1] in SUPPORTED_DIMS
            and unavailable_reason(a.device) == "")


@functools.cache
def _twiddles(dim: int, device: torch.device) -> Tensor:
    """W_D^m = exp(-2πi m/D), m < D, as (D, 2) float32 (cos, -sin), from float64."""
    angle = torch.arange(dim, dtype=torch.float64) * (2 * torch.pi / dim)
    return torch.stack([angle.cos(), -angle.sin()], dim=-1).to(device=device, dtype=torch.float32).contiguous()


def _launch(x: Tensor, y: Tensor, conj_x: bool, values: int = 0) -> Tensor:
    """irfft(op(rfft(x))·rfft(y)) over the last dimension, op = conj when `conj_x`; `values` picks the build."""
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    rows, dim = x.numel() // x.shape[-1], x.shape[-1]
    if rows == 0:
        return out
    if not x.is_cuda:  # tests: the same kernel source compiled for the CPU
        emulator = _emulator(values)[0]
        assert emulator is not None, emulator_unavailable_reason()
        code = emulator.memarch_hrr_bind_emulated(x.data_ptr(), y.data_ptr(), out.data_ptr(), rows, dim,
                                                  int(conj_x), _twiddles(dim, x.device).data_ptr())
    else:
        library = _library(torch.cuda.get_device_capability(x.device), values)[0]
        assert library is not None
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            code = library.memarch_hrr_bind(x.data_ptr(), y.data_ptr(), out.data_ptr(), rows, dim, int(conj_x),
                                            _twiddles(dim, x.device).data_ptr(), stream)
    if code != 0:
        raise RuntimeError(f"memarch_hrr_bind failed with code {code} (D={dim}, rows={rows}); "
                           "MEMARCH_DISABLE_KERNELS=bind falls back to torch.fft")
    return out


class _FusedBind(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, conjugate_a: bool) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.conjugate_a = conjugate_a
        return _launch(a, b, conjugate_a)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = None
        if ctx.conjugate_a:  # c = a ⋆ b (correlation): dL/da = g ⋆ b, dL/db = a ⊛ g
            if ctx.needs_input_grad[0]:
                grad_a = _launch(grad, b, True)
            if ctx.needs_input_grad[1]:
                grad_b = _launch(a, grad, False)
        else:  # c = a ⊛ b: dL/da = b ⋆ g, dL/db = a ⋆ g
            if ctx.needs_input_grad[0]:
                grad_a = _launch(b, grad, True)
            if ctx.needs_input_grad[1]:
                grad_b = _launch(a, grad, True)
        return grad_a, grad_b, None


@eager
def fused_bind(a: Tensor, b: Tensor, conjugate_a: bool = False) -> Tensor:
    """a ⊛ b (or a ⋆ b, the correlation irfft(conj(rfft(a))·rfft(b)), with `conjugate_a`) by the fused kernel,
    differentiable. Operands as `fused_bind_supported` requires, or CPU float32 tensors of one shape with D in
    SUPPORTED_DIMS, which run the kernel's source compiled for the CPU (`hrr_bind_emulate.cpp`; for tests)."""
    apply = cast(Callable[..., Tensor], _FusedBind.apply)
    return apply(a, b, conjugate_a)
