"""Whose fault a failed forward is. A runner exception is one request's
(bad input state: it fails alone) or the device's: a CUDA error (illegal
memory access, device-side assert, a failed launch, ...), or an
out-of-memory that persists when the request runs alone. After a device
fault nothing on the device can be trusted, so the engine stops: the server
fails every request in flight, turns /health 503 and exits non-zero for an
orchestrator to restart it (as vLLM does). Torch is imported only to
classify an error, so ``DeviceFault`` can be caught where torch is not."""
from __future__ import annotations

# Words of the errors CUDA (and the libraries on it) report once the device or context is broken.
_DEVICE_ERRORS = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure",
                  "misaligned address", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL error", "ECC error",
                  "HIP error")


class DeviceFault(RuntimeError):
    """The device failed: the engine cannot go on."""


# Allocation failures the libraries report as their own status, not as torch's OutOfMemoryError.
_ALLOC_ERRORS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """Out of device memory: torch's error, or a library's failed allocation (cuBLAS's handle or
    workspace), which a smaller batch can avoid as well."""
    import torch

    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message \
        or any(word in message for word in _ALLOC_ERRORS)


def is_device_error(error: BaseException) -> bool:
    """A CUDA error: ``torch.AcceleratorError`` (torch >= 2.8) or a RuntimeError saying so. An
    allocation failure is not one, though it is worded as a CUDA error: it is an out of memory."""
    import torch

    if any(word in str(error) for word in _ALLOC_ERRORS):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(error, accelerator):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in _DEVICE_ERRORS)


def check_device(error: BaseException, alone: bool) -> None:
    """Raises DeviceFault if ``error`` (from a batch, or from one request
    ``alone``) is the device's: a CUDA error, or out of memory for one
    request alone (a batch's is retried split). A DeviceFault already
    (a tensor-parallel worker died) goes on as it is."""
    if isinstance(error, DeviceFault):
        raise error
    if is_device_error(error) or (alone and is_out_of_memory(error)):
        raise DeviceFault(f"device fault: {type(error).__name__}: {error}") from error
