"""Small per-step uploads from the host."""
import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of values (a list, or a list of equal-length lists) on device. On CUDA it goes through
    pinned memory, so the copy is asynchronous and the host does not wait for the device."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)
