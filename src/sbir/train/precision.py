"""Mixed precision and host-to-device copies of the training loops (``ray.precision``, ``ray.pin_memory``).

:meth:`sbir.stage.StageContext.train` puts the stage's :class:`~sbir.config.RayParams` into every loop's
config (``config["ray"]``); a loop builds ``dev = LoopDevice.from_config(config, device)`` after
``rt.setup_worker`` and

* runs its forward passes and losses inside ``with dev.autocast():`` (fp32: no autocast; bf16: CPU and
  CUDA; fp16: CUDA only; auto, the default: bf16 where the hardware has it natively, else fp32);
* steps with ``dev.step(optimizer, loss, modules)``: backward outside autocast (as torch recommends), the
  gradient all-reduce, clipping of the unscaled gradients, the step. In fp16 the loss is scaled and a
  step whose gradients overflowed is skipped (``torch.amp.GradScaler``; the all-reduce comes first, so
  every worker skips the same steps); fp32 and bf16 scale nothing;
* copies its batches with ``dev.to(x)`` (pinned and non-blocking with ``pin_memory`` on CUDA) and decodes
  its images on ``dev.decode_workers`` threads (``load_image_set(..., workers=)``).

Loss functions decorated with :func:`fp32` run outside autocast on fp32 inputs: on CUDA autocast keeps
softmax, log, exp and sums in fp32 anyway, but on CPU those ops stay in their input's dtype, so a bf16 run
would otherwise compute the metric losses in bf16. Evaluation and embedding code runs in fp32.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping

import torch

from sbir.config import ParamsError, RayParams
from sbir.train import runtime as rt

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOW = (torch.bfloat16, torch.float16)


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    device = torch.device(device)
    check_device(precision, device)
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def native_bf16(use_gpu: bool) -> bool:
    """Whether the training device computes bf16 natively: a CUDA GPU that supports it, or a CPU with the
    AVX512-BF16 or AMX-BF16 instructions (Linux: /proc/cpuinfo). Elsewhere bf16 is emulated and slower
    than fp32, so ``auto`` stays fp32 there."""
    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(use_gpu: bool) -> str:
    """What ``precision: auto`` means on this machine: bf16 where native, else fp32."""
    return "bf16" if native_bf16(use_gpu) else "fp32"


def resolve(ray: RayParams) -> RayParams:
    """``ray`` with ``precision: auto`` resolved for this machine (bf16 where native, else fp32); a
    precision given explicitly stays as it is. Stages resolve before Ray starts, so every worker of a
    run computes in the same precision (the driver decides, like ``use_gpu: auto``)."""
    if ray.precision != "auto":
        return ray
    return ray.model_copy(update={"precision": auto_precision(rt.use_gpu(ray))})


def check_device(precision: str, device: torch.device | str) -> None:
    """ValueError for a precision the device cannot run (fp16 autocast and its scaler need CUDA)."""
    if precision not in DTYPES:
        raise ValueError(f"ray.precision: unknown precision {precision!r} (fp32, bf16 or fp16)")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(f"ray.precision fp16 needs a CUDA device (this worker runs on {torch.device(device)}); "
                         "use bf16 (CPU and CUDA) or fp32")


def check_before_start(ray: RayParams) -> None:
    """Refuse fp16 before Ray starts when the workers will not get a GPU. The same test as the runtime's
    GPU choice (``use_gpu: auto`` = whether this process sees CUDA)."""
    if ray.precision == "fp16" and not rt.use_gpu(ray):
        raise ParamsError(f"ray.precision fp16 needs CUDA workers (ray.use_gpu is {ray.use_gpu!r} and "
                          f"{'CUDA is available' if torch.cuda.is_available() else 'no CUDA device is visible'}); "
                          "use bf16 (CPU and CUDA) or fp32")


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A loss scaler that acts in fp16 only (bf16 has fp32's exponent range: nothing underflows); for fp32
    and bf16 it is disabled: ``scale`` returns the loss, ``step`` is ``optimizer.step()``."""
    device = torch.device(device)
    check_device(precision, device)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_fp32(x: Any) -> Any:
    """A bf16/fp16 tensor as fp32; anything else unchanged."""
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW else x


def fp32(fn: Callable) -> Callable:
    """Decorator: run ``fn`` (a loss) outside autocast with its bf16/fp16 tensor arguments cast to fp32."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        with contextlib.ExitStack() as stack:
            for d in active:
                stack.enter_context(torch.autocast(d, enabled=False))
            return fn(*(to_fp32(a) for a in args), **{k: to_fp32(v) for k, v in kwargs.items()})

    return run


def to_device(x: torch.Tensor, device: torch.device | str, pin_memory: bool = False) -> torch.Tensor:
    """``x`` on ``device``; with ``pin_memory`` on CUDA through page-locked memory and non-blocking, so the
    copy overlaps the host's next work (torch keeps the pinned block until the copy is done). Pinning needs
    CUDA: elsewhere this is a plain ``x.to(device)``."""
    device = torch.device(device)
    if pin_memory and device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@dataclass
class LoopDevice:
    """How a training loop uses its device: autocast, the fp16 loss scaler, batch copies, and the threads
    that decode its images at load (``ray.decode_workers``)."""

    device: torch.device
    precision: str = "fp32"
    pin_memory: bool = False
    decode_workers: int = 0
    scaler: torch.amp.GradScaler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.precision == "auto":  # a loop called directly (a stage resolves before Ray starts)
            self.precision = auto_precision(self.device.type == "cuda")
        self.scaler = grad_scaler(self.device, self.precision)  # also refuses fp16 off CUDA

    @classmethod
    def from_config(cls, config: Mapping[str, Any], device: torch.device) -> "LoopDevice":
        """From the loop config's ``ray`` (RayParams); fp32 and plain copies when it has none (a loop called
        directly, outside a stage)."""
        ray: RayParams = config.get("ray") or RayParams()
        return cls(device, ray.precision, ray.pin_memory, ray.decode_workers)

    def autocast(self) -> ContextManager:
        return autocast(self.device, self.precision)

    def to(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.device, self.pin_memory)

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
             modules: torch.nn.Module | Iterable[torch.nn.Module] | None = None,
             clip: Callable[[], Any] | None = None) -> None:
        """zero_grad, backward, average the gradients of ``modules`` over workers, clip (``clip``, on
        unscaled gradients), step; in fp16 with loss scaling. Also right inside an autocast region (a loop
        whose region covers several steps)."""
        in_autocast = torch.is_autocast_enabled(self.device.type)
        with torch.autocast(self.device.type, enabled=False) if in_autocast else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if modules is not None:
                rt.sync_gradients(modules)
            if clip is not None:
                self.scaler.unscale_(optimizer)
                clip()
            self.scaler.step(optimizer)
            self.scaler.update()
        if in_autocast:
            # autocast keeps the low-precision copy of each trained weight until its region ends: without
            # this, the rest of the region would still compute with the weights from before the step
            torch.clear_autocast_cache()
