"""Host-to-device copies that never wait for the device.

A copy from pageable host memory synchronises with the stream (it waits for every step already
queued), which would serialise the host's preparation of step N+1 with the device's run of step N.
Staging through pinned memory makes the copy truly asynchronous.
"""

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
    elif isinstance(values, np.ndarray):
        host = torch.from_numpy(values).to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
