"""Worker of test_fsdp.py: torchrun --nproc_per_node=2 tests/fsdp_worker.py RESULT_DIR

For every router (and capacity, shared experts, a gated shared expert, the llama flavour, expert parallelism
under FSDP): a reference GPT with the whole model in this process, and the same GPT sharded by fsdp.shard
over the 2 ranks (with ep_size=2, each rank holding half the experts, FSDP over the ranks that hold the same
experts). Each rank feeds the sharded model its own batch; the reference takes both batches, one forward
each, and backs the mean of the two losses (what the ranks' FSDP gradients average to). The sharded model's
loss must be the reference's loss on this rank's batch, and every parameter's gradient, gathered whole
(fsdp.whole), the reference's, and so must every parameter after one AdamW step. Writes RESULT_DIR/rank{r}.json: case -> list of problems.
"""
import json
import sys
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fsdp  # noqa: E402
import moe  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CASES = {name: dict(router=name, top_k=1 if name == 'switch' else 2) for name in moe.ROUTERS}
CASES |= {
    'capacity': dict(router='softmax', capacity_factor=1.0),
    'shared_gate_llama': dict(router='softmax', n_shared_experts=1, shared_gate=True, arch='llama'),
    'deepseek_ep2': dict(router='deepseek', n_shared_experts=1, ep_size=2),
    'sigmoid_ep2_recompute': dict(router='sigmoid', ep_size=2, activation_checkpointing='block'),
}


def make(case, ep):
    kw = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False,
              n_experts=4, router_jitter=0.0)
    kw |= {k: v for k, v in CASES[case].items() if k != 'ep_size'}
    options = {k: kw.pop(k) for k in list(kw) if k in moe.router_settings()}
    return GPTConfig(**kw, router_options=options, ep_size=ep)


def batch(rank):
    return torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(rank))


def compare(case, rank, world):
    ep = CASES[case].get('ep_size', 1)
    torch.manual_seed(0)
    ref = GPT(make(case, 1))
    model = GPT(make(case, ep))
    model.load_state_dict({k: moe.local_tensor(k, v, ep, rank) for k, v in ref.state_dict().items()})
    dense_mesh, expert_mesh, ep_group, _ = fsdp.meshes('cpu', world, ep)
    if ep > 1:
        moe.set_expert_parallel(model, ep_group)
    moe.set_balance_group(model, dist.group.WORLD)
    fsdp.shard(model, dense_mesh, expert_mesh)
    torch.manual_seed(1)
    _, loss = model(batch(rank), batch(rank))
    loss.backward()
    losses = []
    for r in range(world):
        torch.manual_seed(1)
        losses.append(ref(batch(r), batch(r))[1])
        (losses[-1] / world).backward()
    bad = []
    if not torch.allclose(loss, losses[rank], rtol=1e-5):
        bad.append(f"loss {loss.item()} != {losses[rank].item()}")
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        q = grads[name]
        got = None if q.grad is None else fsdp.whole(name, q.grad, ep, ep_group)
        if (got is None) != (p.grad is None):
            bad.append(f"{name}: a gradient on one side only")
        elif got is not None and not torch.allclose(got, p.grad, rtol=1e-4, atol=1e-6):
            bad.append(f"{name}: max abs diff {(got - p.grad).abs().max().item():.3g}")
    # one AdamW step (fused, as train.py's) on the shards and on the whole model: each shard's
    # update in its place. Adam's first step is about lr * sign(g): float noise in a near-zero
    # gradient moves a weight by up to lr (1e-4 here), a misplaced update moves it by lr anywhere
    for m in (model, ref):
        m.configure_optimizers(0.1, 1e-4, (0.9, 0.99), 'cpu').step()
    for name, p in ref.named_parameters():
        got = fsdp.whole(name, grads[name].detach(), ep, ep_group)
        if not torch.allclose(got, p.detach(), rtol=1e-5, atol=1e-6):
            bad.append(f"{name} after a step: max abs diff {(got - p).abs().max().item():.3g}")
    return bad


def mixed_precision(rank, world):
    """dtype bfloat16 (train.py: fsdp.shard's compute_dtype and autocast): attention, the experts and
    the shared expert gathered in bf16, the router and the norms in float32; the loss and every
    gradient (float32 shards) as the whole model's under the same autocast, to bf16's precision"""
    torch.manual_seed(0)
    cfg = make('shared_gate_llama', 1)
    ref, model = GPT(cfg), GPT(cfg)
    model.load_state_dict(ref.state_dict())
    dense_mesh, _, _, _ = fsdp.meshes('cpu', world, 1)
    fsdp.shard(model, dense_mesh, compute_dtype=torch.bfloat16)
    seen = {}
    block = model.transformer.h[0]
    for name, m in (('attn', block.attn.c_proj), ('experts', block.mlp.experts),
                    ('shared', block.mlp.shared), ('router', block.mlp.router.gate),
                    ('norm', block.ln_1)):
        def hook(mod, args, name=name):
            # the parameter as the forward sees it, after FSDP's gather
            seen.setdefault(name, next(mod.parameters()).dtype)
        m.register_forward_pre_hook(hook)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss = model(batch(rank), batch(rank))
    loss.backward()
    losses = []
    for r in range(world):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            losses.append(ref(batch(r), batch(r))[1])
        (losses[-1] / world).backward()
    low = {'attn', 'experts', 'shared'}
    bad = [f"{n} gathered in {dt}" for n, dt in seen.items()
           if dt != (torch.bfloat16 if n in low else torch.float32)]
    if len(seen) != 5:
        bad.append(f"units seen: {sorted(seen)}")
    if not torch.allclose(loss.float(), losses[rank].float(), rtol=1e-2):
        bad.append(f"loss {loss.item()} != {losses[rank].item()}")
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        g = grads[name].grad
        got = fsdp.whole(name, g)
        if g.dtype != torch.float32 or not torch.allclose(got, p.grad, rtol=5e-2, atol=2e-3):
            bad.append(f"{name}: {g.dtype}, max abs diff {(got - p.grad).abs().max().item():.3g}")
    return bad


def main():
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case in [*CASES, 'bfloat16']:
        try:
            check = mixed_precision if case == 'bfloat16' else partial(compare, case)
            results[case] = check(rank, world)
        except Exception:
            results[case] = [traceback.format_exc()]
    Path(sys.argv[1], f'rank{rank}.json').write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
