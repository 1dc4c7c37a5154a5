"""torchrun's machinery for every script: this process's rank, world size and device, over gloo or nccl; the
group's key-value store (for work shared across nodes); FSDP2 sharding of a model, block by block."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

_STORE: list[dist.Store] = []  # the store the group was built on, set by setup_distributed


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
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # The store env:// would build, built here so that scripts can share work through it (shared_store).
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=dist.default_pg_timeout)
    if agent_store:
        # torchrun keeps one store across restarts: a restarted group would read the dead group's addresses, so
        # each attempt gets its own key prefix. The attempt comes from one counter that every worker of an
        # attempt adds to once, so all nodes agree on it: their agents' restart counts may not (an agent whose
        # worker was still healthy restarts it without counting a restart).
        attempt = (store.add("slm/workers_started", 1) - 1) // world
        store = dist.PrefixStore(f"slm/attempt_{attempt}", store)
    _STORE[:] = [store]
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def shared_store() -> dist.Store:
    """The process group's key-value store (torchrun's, reachable from every node): atomic counters and keys."""
    if not _STORE:
        raise RuntimeError("shared_store() needs setup_distributed() under torchrun first")
    return _STORE[0]


def shard_model(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> torch.nn.Module:
    """FSDP2 over every rank: each block's parameters, gradients and optimizer state are split across the ranks
    and gathered only while the block runs; the root takes the rest (embedding, final norm, head). Build the
    optimizer after this: the parameters become DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)
