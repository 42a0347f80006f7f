"""Worker of test_ep.py: torchrun --nproc_per_node=W tests/ep_worker.py RESULT_DIR

On every rank, for every case and every EP size (W, and 2 when W=4: two EP groups of consecutive ranks):
a reference MoE layer with all the experts (ep_size=1) and an expert-parallel layer with this rank's slice
(ep_size=ep, moe.set_expert_parallel over the EP group), the same parameters. Each rank feeds both its own
tokens. The EP layer must give the reference's output, aux losses and gradients w.r.t. the input, the router
and the shared experts on this rank's tokens, and for its local experts the SUM over the EP group's ranks of
the reference's expert gradients (every rank's tokens that reached the expert). Writes RESULT_DIR/rank{r}.json.
"""
import json
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe  # noqa: E402
from model import GPTConfig  # noqa: E402

E, D, H, B, S = 8, 16, 24, 2, 8  # experts, width, expert hidden, tokens per rank = B * S
RTOL, ATOL = 1e-5, 1e-6
CASES = {
    'softmax_bias': dict(router='softmax', top_k=2, bias=True),
    'sigmoid': dict(router='sigmoid', top_k=2),
    'deepseek_shared': dict(router='deepseek', top_k=2, n_shared_experts=1, routed_scale=2.5,
                            balance_scope='sequence'),
    'capacity': dict(router='softmax', top_k=2, capacity_factor=1.0),
    'shared_llama_top1': dict(router='softmax', top_k=1, n_shared_experts=1, arch='llama'),
    'zero_tokens': dict(router='softmax', top_k=2),  # skewed tokens: see tokens()
    'switch_capacity': dict(router='switch', top_k=1, capacity_factor=1.25),
    'tcmoe': dict(router='tcmoe', top_k=2),
    'moepp': dict(router='moepp', top_k=2),
    'grouped_bias': dict(router='softmax', top_k=2, bias=True, expert_impl='grouped'),  # the others: auto = loop on CPU
    'remoe': dict(router='remoe', top_k=2),  # a variable number of experts per token (UNUSED slots)
    'topp': dict(router='topp', top_k=2, n_shared_experts=1, shared_gate=True),
    'expert_choice': dict(router='expert_choice', top_k=2),
    'sqrtsoftplus': dict(router='deepseek', top_k=2, routed_scale=1.5,
                         router_options=dict(score_function='sqrtsoftplus')),
    'quantile': dict(router='quantile', top_k=2, router_options=dict(qb_score_function='sigmoid')),
    'latent': dict(router='softmax', top_k=2, moe_latent_size=8, n_shared_experts=1, arch='llama'),
}


def make_config(case, ep):
    kw = dict(n_embd=D, n_head=4, n_experts=E, bias=False, ep_size=ep)
    kw.update(CASES[case])
    return GPTConfig(**kw)


def tokens(case, rank):
    """this rank's tokens (different on every rank); for zero_tokens, rank 0 prefers experts 1..E-1 and every
    other rank the last two experts, so expert 0 gets nothing and ranks > 0 send nothing to most EP peers"""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, S, D, generator=g)
    if case == 'zero_tokens':
        keep = torch.zeros(D, dtype=torch.bool)
        keep[list(range(1, E)) if rank == 0 else [E - 2, E - 1]] = True
        x[..., :E] = 0.3 * x[..., :E] + torch.where(keep[:E], 3.0, -3.0)
    return x.requires_grad_()


def reference_layer(case):
    torch.manual_seed(1234)  # the same layer on every rank
    layer = moe.MoE(make_config(case, 1), H)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
        if case == 'zero_tokens':
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[:, :E] = 4 * torch.eye(E)
        if isinstance(layer.router, moe.DeepSeekRouter):
            layer.router.expert_bias.normal_(0, 0.05)
        if isinstance(layer.router, moe.QuantileRouter):
            layer.router.qb_beta.normal_(0, 0.3)
    return layer


def run(layer, x, case, rank):
    torch.manual_seed(7 + rank)  # the same switch jitter in both layers
    y, aux = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(200 + rank))
    loss = (y * g).sum() + aux['balance'] + aux['z'] + aux['router']
    loss.backward()
    return y.detach(), torch.stack([torch.as_tensor(aux[k]).float() for k in ('balance', 'z', 'router')]).detach()


def compare(case, ep, group, rank):
    ep_rank = dist.get_rank(group)
    ref = reference_layer(case)
    layer = moe.MoE(make_config(case, ep), H)
    state = {k: (v.chunk(ep)[ep_rank].clone() if k.startswith('experts.') else v) for k, v in ref.state_dict().items()}
    layer.load_state_dict(state)
    moe.set_expert_parallel(layer, group)
    assert layer.experts.c_fc.shape[0] == E // ep and layer.ep_group is group

    x_ref, x_ep = tokens(case, rank), tokens(case, rank)
    y_ref, aux_ref = run(ref, x_ref, case, rank)
    y_ep, aux_ep = run(layer, x_ep, case, rank)

    pairs = {'output': (y_ep, y_ref), 'aux': (aux_ep, aux_ref), 'grad input': (x_ep.grad, x_ref.grad)}
    ep_params = dict(layer.named_parameters())
    for name, p in ref.named_parameters():
        q = ep_params[name]
        if name.startswith('experts.'):  # sum over the EP group's ranks, then this rank's slice
            full = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(full, group=group)
            pairs[f'grad {name}'] = (q.grad, full.chunk(ep)[ep_rank])
        else:
            pairs[f'grad {name}'] = (q.grad, p.grad)
    errors, bad = {}, []
    for key, (got, want) in pairs.items():
        if got is None or want is None:
            errors[key] = None
            if (got is None) != (want is None):
                bad.append(f'{key}: grad is {"None" if got is None else "set"} in the EP layer, '
                           f'{"None" if want is None else "set"} in the reference')
            continue
        errors[key] = (got - want).abs().max().item() if got.numel() else 0.0
        if got.shape != want.shape or not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            bad.append(f'{key}: max abs diff {errors[key]:.3g}')
    ids = ref.load  # assignments per expert from this rank's tokens (record_stats)
    return dict(bad=bad, errors=errors, sends=ids.view(ep, E // ep).sum(1).tolist(), load=ids.tolist(),
                dropped=ref.sums[2].item())


def global_balance(router, rank, world):
    """balance_scope='global' with the counts summed over the world (moe.set_balance_group), two micro-batches of a
    step, each rank its own tokens, against one process holding every rank's tokens of each micro-batch: the mean over
    the ranks of the balance loss (what train.py logs) and of the router gradient (what DDP applies) must equal the
    whole batch's; each rank's input gradient over the world size (the mean's factor) is its rows of the whole
    batch's"""
    cfg = GPTConfig(n_embd=D, n_head=4, n_experts=E, bias=False, router=router, top_k=2, balance_scope='global')
    torch.manual_seed(1234)
    layer = moe.MoE(cfg, H)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    ref = moe.MoE(cfg, H)
    ref.load_state_dict(layer.state_dict())
    moe.set_balance_group(layer, dist.group.WORLD)  # ref: no group, one process holding everything
    bad, errors = [], {}
    for m in range(2):  # micro-batches of one step: f from the counts so far, over every rank
        xs = [tokens('global', 10 * m + r) for r in range(world)]  # every rank's tokens, known on every rank
        x, xw = xs[rank], torch.cat([t.detach() for t in xs]).requires_grad_()
        for mod in (layer, ref):
            mod.zero_grad()
        loss = layer(x)[1]['balance']
        loss.backward()
        loss_ref = ref(xw)[1]['balance']
        loss_ref.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grad = layer.router.gate.weight.grad.clone()
        dist.all_reduce(grad)
        pairs = {f'mb{m} loss': (mean_loss / world, loss_ref.detach()),
                 f'mb{m} grad router': (grad / world, ref.router.gate.weight.grad),
                 f'mb{m} grad input': (x.grad / world, xw.grad[rank * B:(rank + 1) * B])}
        for key, (got, want) in pairs.items():
            errors[key] = (got - want).abs().max().item()
            if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                bad.append(f'{key}: max abs diff {errors[key]:.3g}')
        if m == 0 and abs(loss.item() - moe.balance_loss(layer.router(x.view(-1, D)).probs,
                                                          layer.router(x.view(-1, D)).ids).item()) < 1e-6:
            bad.append('the global loss equals the local one: the case does not exercise the counts of other ranks')
    return dict(bad=bad, errors=errors)


def autocast_exchange(ep, group, rank):
    """bf16 autocast (train.py's): the EP layer exchanges its tokens and their weights in bf16, the compute dtype,
    not the norm's fp32 (every all_to_all_single of floating tensors is recorded), and gives the one-process layer's
    output, input gradient and local expert gradients to the bf16 tolerance of test_moe.py's bf16 test"""
    ep_rank = dist.get_rank(group)
    ref = reference_layer('softmax_bias')
    layer = moe.MoE(make_config('softmax_bias', ep), H)
    layer.load_state_dict({k: (v.chunk(ep)[ep_rank].clone() if k.startswith('experts.') else v)
                           for k, v in ref.state_dict().items()})
    moe.set_expert_parallel(layer, group)
    sent = []
    exchange = dist.all_to_all_single

    def recording(out, x, *args, **kwargs):
        if x.is_floating_point():
            sent.append(str(x.dtype))
        return exchange(out, x, *args, **kwargs)

    x_ref, x_ep = tokens('softmax_bias', rank), tokens('softmax_bias', rank)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_ref, _ = run(ref, x_ref, 'softmax_bias', rank)
        moe.dist.all_to_all_single = recording
        try:
            y_ep, _ = run(layer, x_ep, 'softmax_bias', rank)
        finally:
            moe.dist.all_to_all_single = exchange
    full = ref.experts.c_fc.grad.clone()
    dist.all_reduce(full, group=group)
    pairs = {'output': (y_ep.float(), y_ref.float()), 'grad input': (x_ep.grad, x_ref.grad),
             'grad experts.c_fc': (layer.experts.c_fc.grad, full.chunk(ep)[ep_rank])}
    bad, errors = [], {}
    for key, (got, want) in pairs.items():
        errors[key] = (got - want).abs().max().item()
        if not torch.allclose(got, want, rtol=3e-2, atol=3e-2):
            bad.append(f'{key}: max abs diff {errors[key]:.3g}')
    return dict(bad=bad, errors=errors, sent=sent, dtype=str(y_ep.dtype))


def main():
    out = Path(sys.argv[1])
    dist.init_process_group('gloo', timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for ep in ([world, 2] if world == 4 else [world]):
        groups = [dist.new_group(list(range(g * ep, (g + 1) * ep))) for g in range(world // ep)]
        group = groups[rank // ep]
        for case in CASES:
            try:
                results[f'{case}/ep{ep}'] = compare(case, ep, group, rank)
            except Exception:
                results[f'{case}/ep{ep}'] = dict(bad=['exception: ' + traceback.format_exc()])
            dist.barrier()
        try:
            results[f'autocast_bf16/ep{ep}'] = autocast_exchange(ep, group, rank)
        except Exception:
            results[f'autocast_bf16/ep{ep}'] = dict(bad=['exception: ' + traceback.format_exc()])
        dist.barrier()
    for router in ('softmax', 'topp'):
        try:
            results[f'global_balance_{router}/dp{world}'] = global_balance(router, rank, world)
        except Exception:
            results[f'global_balance_{router}/dp{world}'] = dict(bad=['exception: ' + traceback.format_exc()])
        dist.barrier()
    (out / f'rank{rank}.json').write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
