"""torchrun's machinery for every script: this process's rank, world size and device, over gloo or nccl."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device): one process, or one rank of torchrun's group (gloo on CPU; nccl on CUDA,
    each rank on its LOCAL_RANK's GPU)."""
    device = torch.device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if cuda else {}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one store across restarts: a restarted group would read the dead group's addresses, so
        # each attempt gets its own key prefix. The attempt comes from one counter that every worker of an
        # attempt adds to once, so all nodes agree on it: their agents' restart counts may not (an agent whose
        # worker was still healthy restarts it without counting a restart).
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
        attempt = (store.add("slm/workers_started", 1) - 1) // world
        kwargs |= {"store": dist.PrefixStore(f"slm/attempt_{attempt}", store), "rank": rank, "world_size": world}
    dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    return dist.get_rank(), dist.get_world_size(), device
