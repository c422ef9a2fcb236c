"""The tensor-parallel group: which rank this process is, and the collectives the layers call.

One process per rank, all on torch.distributed: NCCL carries activations between GPUs (gloo on
CPU), and a second, gloo group carries each step's inputs (plain Python objects) from rank 0 to
the other ranks. The layers receive the group when they are built; with one rank every collective
is the identity, so single-device code pays nothing.
"""

import os
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

# NVLink multicast can put a shared host's GPUs out of service: NCCL, PyTorch and NVSHMEM must
# never use it. Set in every process we start, before anything initialises CUDA or NCCL.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    os.environ.update(NO_MULTICAST_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    cpu_group: object = None   # gloo group for Python objects (the default group on CPU)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank 0's slice first."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into every rank's x, in place."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def broadcast_object(self, obj=None):
        """Rank 0's Python object, returned on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def min_over_ranks(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


SINGLE = TPGroup()


def init_group(rank: int, size: int, port: int, device_type: str) -> TPGroup:
    """Join the process group of `size` ranks rendezvousing on 127.0.0.1:port."""
    disable_multicast()
    if size == 1:
        return SINGLE
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                                device_id=torch.device("cuda", rank))
        cpu_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        cpu_group = dist.group.WORLD
    return TPGroup(rank, size, cpu_group)


def destroy_group(timeout: float = 10.0) -> bool:
    """Leave the process group; False if that did not finish in `timeout` seconds. NCCL's teardown
    waits for the other ranks to leave as well, so it runs aside: a dead peer must not hang us."""
    if not dist.is_initialized():
        return True
    leaving = threading.Thread(target=dist.destroy_process_group, name="pagedllm-tp-destroy", daemon=True)
    leaving.start()
    leaving.join(timeout)
    return not leaving.is_alive()
