"""
Sharded data parallelism: torch's FSDP2 (`fully_shard`) over the data-parallel ranks, composed with
moe.py's expert parallelism. train.py --parallel=fsdp uses it; docs/training.md#sharding.

- Layout (torchtitan's): dense parameters are sharded over every rank; with ep_size > 1 each rank
  keeps E / ep_size experts (moe.py) and FSDP shards them over the ranks that hold the same experts,
  a 2-D mesh (edp, ep) whose EP groups are moe.expert_groups' consecutive ranks. Expert gradients
  are summed over edp and divided by the world size, as DDP's hand-written reduction does, so a step
  is one process's (tests/test_fsdp.py).
- fully_shard per block, then on the whole model (embeddings, final norm, head). Parameters stay
  float32 and are gathered so; bf16 is autocast's, as under DDP: FSDP's bf16 param_dtype would cast
  the routers' weights, whose math is float32 for every router (docs/routers.md).
- Every sharding here cuts dim 0 into torch.chunk's pieces (FSDP2's Shard(0), EP's E / ep_size
  experts), so a rank's part of a tensor is a range of rows of the whole model's: rows() says which,
  and checkpoint.py's sharded format stores each rank's rows with their range.
"""
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import moe


def meshes(device_type, world_size, ep_size):
    """(mesh of every rank for the dense parameters, mesh of the ranks holding the same experts or
    None, EP group, expert data-parallel group); rank = edp * ep_size + ep"""
    dense = init_device_mesh(device_type, (world_size,), mesh_dim_names=('dp',))
    if ep_size == 1:
        return dense, None, None, None
    mesh = init_device_mesh(device_type, (world_size // ep_size, ep_size),
                            mesh_dim_names=('edp', 'ep'))
    return dense, mesh['edp'], mesh.get_group('ep'), mesh.get_group('edp')


def shard(model, dense_mesh, expert_mesh=None):
    """fully_shard model in place: the routed experts of each MoE layer over expert_mesh (with
    expert parallelism), each block and then the whole model over dense_mesh"""
    world_size = dense_mesh.size()
    for block in model.transformer.h:
        if expert_mesh is not None and isinstance(block.mlp, moe.MoE):
            fully_shard(block.mlp.experts, mesh=expert_mesh)
            # summed over edp, divided by every rank: the mean over the world's tokens
            block.mlp.experts.set_gradient_divide_factor(world_size)
            # gloo has no PREMUL_SUM (NCCL's fused scaling): a sum, then the division
            block.mlp.experts.set_force_sum_reduction_for_comms(expert_mesh.device_type == 'cpu')
        fully_shard(block, mesh=dense_mesh)
    fully_shard(model, mesh=dense_mesh)
    return model


def local(t):
    """this rank's part of a tensor: an FSDP shard's local rows, else t"""
    return t.to_local() if isinstance(t, DTensor) else t


def rows(name, t, ep_size=1, ep_rank=0):
    """(start, stop, whole): the rows [start, stop) of the whole model's tensor `name` (of `whole`
    rows) that t, this rank's part of it, holds"""
    if t.dim() == 0:
        return 0, 0, 0
    n = t.shape[0]  # a DTensor's shape is the one over its mesh
    start, stop = 0, n
    if isinstance(t, DTensor):
        assert tuple(t.placements) == (Shard(0),), t.placements
        size, coord = t.device_mesh.size(), t.device_mesh.get_local_rank()
        chunk = -(-n // size)  # torch.chunk's
        start, stop = min(coord * chunk, n), min((coord + 1) * chunk, n)
    if ep_size > 1 and moe.is_expert(name):
        return start + ep_rank * n, stop + ep_rank * n, n * ep_size
    return start, stop, n


def shard_entry(name, t, ep_size=1, rank=0):
    """a sharded checkpoint's entry of this rank's part t of tensor `name`: its rows (on the CPU)
    and where they lie in the whole model's; None where t is whole on every rank and rank 0 writes
    it"""
    if not isinstance(t, DTensor) and not (ep_size > 1 and moe.is_expert(name)) and rank:
        return None
    start, stop, n = rows(name, t, ep_size, rank % ep_size)
    return dict(start=start, stop=stop, rows=n, t=local(t).detach().cpu())


def whole(name, t, ep_size=1, ep_group=None):
    """the whole model's tensor from this rank's part (collective: every rank calls it)"""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return moe.full_tensor(name, t, ep_size, ep_group)


def part(name, t, like, ep_size=1, rank=0):
    """this rank's part of the whole model's tensor t, laid out as `like` (a parameter of the
    sharded model)"""
    t = moe.local_tensor(name, t, ep_size, rank).to(like.device)
    if isinstance(like, DTensor) and t.dim():
        return distribute_tensor(t, like.device_mesh, like.placements, src_data_rank=None)
    return t
