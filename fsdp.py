"""
Sharded data parallelism: torch's FSDP2 (`fully_shard`) over the data-parallel ranks, composed with
moe.py's expert parallelism. train.py --parallel=fsdp uses it; docs/training.md#sharding.

- Layout (torchtitan's): dense parameters are sharded over every rank; with ep_size > 1 each rank
  keeps E / ep_size experts (moe.py) and FSDP shards them over the ranks that hold the same experts,
  a 2-D mesh (edp, ep) whose EP groups are moe.expert_groups' consecutive ranks. Expert gradients
  are summed over edp and divided by the world size, as DDP's hand-written reduction does, so a step
  is one process's (tests/test_fsdp.py).
- fully_shard per block, then on the whole model (embeddings, final norm, head). In bf16, FSDP's
  MixedPrecisionPolicy gathers the matmul weights (attention, the experts, a dense MLP: units of
  their own) in bf16, as autocast would cast them, and reduces their gradients in float32; the
  norms, routers, embeddings and head stay float32 (every router's math is float32: docs/routers.md).
- FSDP cuts a tensor along one dimension into torch.chunk's pieces: dim 0 (FSDP2's default), but
  dim 1 for the stacked experts (torchtitan's choice), whose dim 0 counts experts, often fewer than
  the ranks (a shared expert has one; ep_size 8 leaves one per rank). EP cuts dim 0 into E / ep_size
  experts. So a rank's part of a tensor is a block of the whole model's: index() says which, and
  checkpoint.py's sharded format stores each rank's block with its place.
"""
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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


def shard(model, dense_mesh, expert_mesh=None, compute_dtype=torch.float32):
    """fully_shard model in place: the routed experts of each MoE layer over expert_mesh (with
    expert parallelism), each block and then the whole model over dense_mesh; with a compute_dtype
    below float32 the matmul weights in units of their own, gathered in it"""
    world_size = dense_mesh.size()
    low = compute_dtype != torch.float32
    # the inputs stay as they come (autocast casts them for the matmuls, the routers take float32)
    mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                 cast_forward_inputs=False)
    stacked = {p for m in model.modules() if isinstance(m, moe.Experts) for p in m.parameters()}

    def placement(p):
        # (E, out, in) and (E, out): along out
        return Shard(1) if p in stacked else Shard(0)

    for block in model.transformer.h:
        is_moe = isinstance(block.mlp, moe.MoE)
        if low:
            matmuls = [block.attn, *([block.mlp.shared] if is_moe else [block.mlp])]
            for unit in filter(None, matmuls):
                fully_shard(unit, mesh=dense_mesh, shard_placement_fn=placement, mp_policy=mixed)
        if is_moe and (expert_mesh is not None or low):
            experts = block.mlp.experts
            fully_shard(experts, mesh=expert_mesh or dense_mesh, shard_placement_fn=placement,
                        mp_policy=mixed if low else MixedPrecisionPolicy())
            if expert_mesh is not None:
                # summed over edp, divided by every rank: the mean over the world's tokens
                experts.set_gradient_divide_factor(world_size)
                # gloo has no PREMUL_SUM (NCCL's fused scaling): a sum, then the division (FSDP
                # divides by hand itself on a mesh of one rank, ep_size = the world)
                experts.set_force_sum_reduction_for_comms(expert_mesh.device_type == 'cpu'
                                                          and expert_mesh.size() > 1)
        fully_shard(block, mesh=dense_mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=dense_mesh, shard_placement_fn=placement)
    return model


def local(t):
    """this rank's part of a tensor: an FSDP shard's local block, else t"""
    return t.to_local() if isinstance(t, DTensor) else t


def index(name, t, ep_size=1, ep_rank=0):
    """(ranges, shape): the block of the whole model's tensor `name` (of that shape) that t, this
    rank's part of it, holds, as a (start, stop) per dimension"""
    shape = list(t.shape)  # a DTensor's shape is the one over its mesh
    ranges = [(0, n) for n in shape]
    if isinstance(t, DTensor):
        (placement,) = t.placements
        d, size, coord = placement.dim, t.device_mesh.size(), t.device_mesh.get_local_rank()
        chunk = -(-shape[d] // size)  # torch.chunk's
        ranges[d] = (min(coord * chunk, shape[d]), min((coord + 1) * chunk, shape[d]))
    if ep_size > 1 and moe.is_expert(name) and shape:
        n = shape[0]
        ranges[0] = (ranges[0][0] + ep_rank * n, ranges[0][1] + ep_rank * n)
        shape[0] = n * ep_size
    assert [b - a for a, b in ranges] == list(local(t).shape), (name, ranges, local(t).shape)
    return ranges, shape


def shard_entry(name, t, ep_size=1, rank=0):
    """a sharded checkpoint's entry of this rank's part t of tensor `name`: the block it holds (on
    the CPU) and its place in the whole model's; None where t is whole on every rank and rank 0
    writes it"""
    if not isinstance(t, DTensor) and not (ep_size > 1 and moe.is_expert(name)) and rank:
        return None
    ranges, shape = index(name, t, ep_size, rank % ep_size)
    return dict(index=ranges, shape=shape, t=local(t).detach().cpu())


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
