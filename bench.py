"""
Speed of the MoE layer, as ratios measured in one run (these machines are noisy; never as a test).

$ python bench.py                       # MoE layer vs dense MLP (same active FLOPs) vs Hugging Face Mixtral
$ python bench.py --dtype=float32 --tokens=8192
$ torchrun --standalone --nproc_per_node=2 bench.py --ep   # training step, tokens/s and all_to_all share

Layer bench: forward + backward of one MoE layer (llama flavour, softmax top-k) on T tokens, against
(a) a dense SwiGLU MLP of hidden k * expert_hidden (the same active FLOPs) and (b) transformers'
MixtralSparseMoeBlock holding the same weights. Timings are interleaved, the median of --reps is kept.
EP bench (--ep): a training step of the default train.py model with sigmoid routing at ep_size 1 and at
ep_size = world size, and the share of the step spent inside all_to_all.
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import moe
from model import GPTConfig, MLP

parser = argparse.ArgumentParser()
parser.add_argument('--tokens', type=int, default=4096)
parser.add_argument('--d', type=int, default=512)
parser.add_argument('--experts', type=int, default=8)
parser.add_argument('--top_k', type=int, default=2)
parser.add_argument('--hidden', type=int, default=1024, help='expert hidden size')
parser.add_argument('--dtype', default='bfloat16')
parser.add_argument('--reps', type=int, default=15)
parser.add_argument('--ep', action='store_true')
args = parser.parse_args()
dtype = getattr(torch, args.dtype)


def fwd_bwd(fn, x, g):
    x = x.detach().requires_grad_()
    y = fn(x)
    (y * g).sum().backward()


def time_all(fns, x, g, reps):
    """median seconds of each fn, interleaved so that load on the machine hits all of them alike"""
    times = {name: [] for name in fns}
    for r in range(reps + 2):
        for name, fn in fns.items():
            t = time.perf_counter()
            fwd_bwd(fn, x, g)
            if r >= 2:  # warmup
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def layer_bench():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    torch.manual_seed(0)
    T, d, E, k, h = args.tokens, args.d, args.experts, args.top_k, args.hidden
    c = GPTConfig(arch='llama', n_embd=d, n_head=8, bias=False, router='softmax', n_experts=E, top_k=k,
                  expert_hidden=h, mlp_hidden=k * h, aux_loss_coef=0.0, z_loss_coef=0.0)
    layer = moe.MoE(c, h).to(dtype)
    layer.router.float()  # router math stays in float32
    torch.nn.init.normal_(layer.experts.c_fc, std=0.02)
    torch.nn.init.normal_(layer.experts.c_proj, std=0.02)
    dense = MLP(c).to(dtype)
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E,
                                             num_experts_per_tok=k)).to(dtype)
    with torch.no_grad():
        hf.gate.weight.copy_(layer.router.gate.weight)
        hf.experts.gate_up_proj.copy_(layer.experts.c_fc)
        hf.experts.down_proj.copy_(layer.experts.c_proj)
    x = torch.randn(1, T, d, dtype=dtype)
    g = torch.randn(1, T, d, dtype=dtype)
    fns = dict(moe=lambda x: layer(x)[0], dense=lambda x: dense(x)[0], mixtral=hf)
    t = time_all(fns, x, g, args.reps)
    print(f"T={T} d={d} E={E} k={k} expert_hidden={h} {args.dtype}, forward+backward, median of {args.reps}:")
    for name, s in t.items():
        print(f"  {name:8s} {s * 1e3:8.2f} ms")
    print(f"  moe / dense (same active FLOPs): {t['moe'] / t['dense']:.3f}x")
    print(f"  mixtral / moe: {t['mixtral'] / t['moe']:.3f}x faster")


def ep_bench():
    """one training step of a small sigmoid MoE at ep_size 1 and ep_size = world, and the all_to_all share"""
    from model import GPT
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    spent = [0.0]
    exchange = dist.all_to_all_single

    def timed_exchange(*a, **kw):  # time every all_to_all_single the MoE layers make
        t = time.perf_counter()
        out = exchange(*a, **kw)
        spent[0] += time.perf_counter() - t
        return out
    moe.dist.all_to_all_single = timed_exchange
    for ep in (1, world):
        torch.manual_seed(0)
        c = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65, bias=False,
                      router='sigmoid', n_experts=8, top_k=2, ep_size=ep)
        model = GPT(c)
        if ep > 1:
            moe.set_expert_parallel(model, dist.group.WORLD)
        x = torch.randint(0, 65, (16, 128))
        steps = []
        for i in range(args.reps + 2):
            spent[0] = 0.0
            t = time.perf_counter()
            with torch.autocast('cpu', dtype=dtype):
                _, loss = model(x, x)
            loss.backward()
            for n, p in model.named_parameters():  # data parallelism's all-reduce (experts: only when replicated)
                if p.grad is not None and (ep == 1 or '.experts.' not in n):
                    dist.all_reduce(p.grad)
            if i >= 2:
                steps.append((time.perf_counter() - t, spent[0]))
        step = statistics.median(s for s, _ in steps)
        share = statistics.median(a / s for s, a in steps)
        if rank == 0:
            print(f"ep_size {ep}, {world} processes: {16 * 128 * world / step:,.0f} tokens/s, "
                  f"all_to_all {share * 100:.1f}% of the step")
    dist.destroy_process_group()


if __name__ == '__main__':
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    ep_bench() if args.ep else layer_bench()
