"""
Speed and memory of the MoE layer and of a training step, as ratios measured in one run (machines are noisy;
never asserted in a test). The machine is printed above every table.

$ python bench.py --dtype=float32       # everything below (default dtype auto: bf16 where the hardware runs it fast)
$ python bench.py --only=layer --reps=15 # one section: layer, memory, step, compile
$ torchrun --standalone --nproc_per_node=2 bench.py --ep   # training step at ep_size 1 and 2, all_to_all share

layer:   forward + backward of one MoE layer (llama flavour, softmax top-k) on T tokens, for each setting
         (E, k, expert_hidden): the grouped and the loop expert paths against (a) a dense SwiGLU MLP of hidden
         k * expert_hidden (the same active FLOPs) and (b) transformers' MixtralSparseMoeBlock holding the same
         weights, with its eager experts (what a standalone block gets) and its grouped_mm experts.
         Timings are interleaved, the median of --reps is kept.
memory:  peak memory of forward + backward of the MoE layer against a dense MLP with the same total parameters
         (hidden E * expert_hidden), each in a fresh process (CPU, Linux: peak resident set above the set-up,
         from /proc; CUDA: max_memory_allocated).
step:    a training step (forward, backward, AdamW) of a small GPT, MoE against the dense GPT with the same
         active parameters, in tokens/s; the MoE routes with force_balance (equal load on every expert, as
         Megatron's and torchtitan's benchmarks), so the step measures the layer, not what a router learned.
         (The layer section keeps the router's own choices: Mixtral must route the same tokens.)
compile: torch.compile(layer) against eager, forward + backward.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import moe
from cli import auto_dtype
from model import GPT, GPTConfig, MLP

parser = argparse.ArgumentParser()
parser.add_argument('--tokens', type=int, default=4096)
parser.add_argument('--d', type=int, default=512)
parser.add_argument('--settings', default='8,2,1024 64,8,128', help="space-separated E,k,expert_hidden")
parser.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'],
                    help='auto (bf16 where the hardware runs it fast, else float32), float32 or bfloat16')
parser.add_argument('--reps', type=int, default=7)
parser.add_argument('--only', choices=['layer', 'memory', 'step', 'compile'])
parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
parser.add_argument('--ep', action='store_true')
parser.add_argument('--memory_probe', help=argparse.SUPPRESS)  # internal: one memory measurement in this process
args = parser.parse_args()
if args.dtype == 'auto':
    args.dtype, why = auto_dtype(args.device.split(':')[0])
    print(f"dtype auto -> {args.dtype}: {why}")
dtype = getattr(torch, args.dtype)
try:
    settings = [tuple(int(v) for v in s.split(',')) for s in args.settings.split()]
    assert settings and all(len(s) == 3 and 1 <= s[1] <= s[0] and s[2] > 0 for s in settings)
except (ValueError, AssertionError):
    parser.error(f"--settings={args.settings!r}: give E,k,expert_hidden triples, 1 <= k <= E: '8,2,1024 64,8,128'")


def machine():
    """one line naming the hardware, threads, torch and dtype"""
    if args.device.startswith('cuda'):
        hw = torch.cuda.get_device_name()
    else:
        info = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
        model = next((ln.split(':', 1)[1].strip() for ln in info.splitlines() if ln.startswith('model name')),
                     platform.processor())
        flags = next((ln.split(':', 1)[1].split() for ln in info.splitlines() if ln.startswith('flags')), [])
        simd = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
        hw = f"{model} ({', '.join(simd) or 'no AVX2'}), {os.cpu_count()} cores"
    return f"machine: {hw}; {torch.get_num_threads()} threads; torch {torch.__version__}; {args.dtype}"


def sync():
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()


def fwd_bwd(fn, x, g):
    x = x.detach().requires_grad_()
    (fn(x) * g).sum().backward()


def time_all(fns, x, g, reps):
    """median seconds of each fn, interleaved so that load on the machine hits all of them alike"""
    times = {name: [] for name in fns}
    for r in range(reps + 2):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fwd_bwd(fn, x, g)
            sync()
            if r >= 2:  # warmup
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def layer_config(E, k, h, **kw):
    return GPTConfig(arch='llama', n_embd=args.d, n_head=8, bias=False, router='softmax', n_experts=E, top_k=k,
                     expert_hidden=h, mlp_hidden=k * h, aux_loss_coef=0.0, z_loss_coef=0.0, **kw)


def moe_layer(E, k, h, impl='auto'):
    torch.manual_seed(0)
    layer = moe.MoE(layer_config(E, k, h, expert_impl=impl), h)
    torch.nn.init.normal_(layer.experts.c_fc, std=0.02)
    torch.nn.init.normal_(layer.experts.c_proj, std=0.02)
    layer = layer.to(args.device, dtype)
    layer.router.float()  # router math stays in float32
    return layer


def mixtral_block(layer, E, k, h, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    c = MixtralConfig(hidden_size=args.d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=k)
    c._experts_implementation = impl
    hf = MixtralSparseMoeBlock(c).to(args.device, dtype)
    with torch.no_grad():
        hf.gate.weight.copy_(layer.router.gate.weight)
        hf.experts.gate_up_proj.copy_(layer.experts.c_fc)
        hf.experts.down_proj.copy_(layer.experts.c_proj)

    def run(x):
        y = hf(x)
        return y[0] if isinstance(y, tuple) else y
    return run


def layer_bench():
    T, d = args.tokens, args.d
    print(f"\nlayer: T={T} d={d}, forward+backward, median of {args.reps} interleaved runs; ratios to the dense "
          f"SwiGLU MLP with the same active FLOPs (hidden k * expert_hidden)\n{machine()}")
    print("| E | k | expert_hidden | dense ms | moe (auto) | moe grouped | moe loop | mixtral eager | "
          "mixtral grouped_mm | mixtral eager / moe (auto) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for E, k, h in settings:
        auto, grouped, loop = moe_layer(E, k, h), moe_layer(E, k, h, 'grouped'), moe_layer(E, k, h, 'loop')
        dense = MLP(layer_config(E, k, h)).to(args.device, dtype)
        x = torch.randn(1, T, d, dtype=dtype, device=args.device)
        g = torch.randn(1, T, d, dtype=dtype, device=args.device)
        fns = dict(dense=lambda x: dense(x)[0], auto=lambda x: auto(x)[0], grouped=lambda x: grouped(x)[0],
                   loop=lambda x: loop(x)[0],
                   mixtral_eager=mixtral_block(grouped, E, k, h, 'eager'),
                   mixtral_grouped=mixtral_block(grouped, E, k, h, 'grouped_mm'))
        t = time_all(fns, x, g, args.reps)
        r = {n: v / t['dense'] for n, v in t.items()}
        print(f"| {E} | {k} | {h} | {t['dense'] * 1e3:.1f} | {r['auto']:.2f} | {r['grouped']:.2f} | {r['loop']:.2f} | "
              f"{r['mixtral_eager']:.2f} | {r['mixtral_grouped']:.2f} | {t['mixtral_eager'] / t['auto']:.2f}x |")


def memory_probe(kind):
    """one forward + backward in this (fresh) process -> peak bytes above the set-up"""
    E, k, h = settings[0]
    T, d = args.tokens, args.d
    torch.manual_seed(0)
    if kind == 'dense':
        net = MLP(layer_config(E, E, h)).to(args.device, dtype)  # hidden E * h: the MoE layer's total parameters
        fn = lambda x: net(x)[0]  # noqa: E731
    else:
        net = moe_layer(E, k, h, kind)
        fn = lambda x: net(x)[0]  # noqa: E731
    x = torch.randn(1, T, d, dtype=dtype, device=args.device)
    g = torch.randn(1, T, d, dtype=dtype, device=args.device)
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, x, g)
        return torch.cuda.max_memory_allocated() - base
    with open('/proc/self/clear_refs', 'w') as f:  # Linux: reset the peak resident set (VmHWM) to the current one
        f.write('5')
    base = resident('VmRSS')
    fwd_bwd(fn, x, g)
    return resident('VmHWM') - base


def resident(field):
    """bytes of this process's resident set now (VmRSS) or at its peak (VmHWM), from /proc/self/status"""
    line = next(ln for ln in open('/proc/self/status') if ln.startswith(field + ':'))
    return int(line.split()[1]) * 1024


def memory_bench():
    print(f"\nmemory: peak of one forward+backward above the set-up (parameters, input), each in a fresh process; "
          f"T={args.tokens} d={args.d}\n{machine()}")
    print("| E | k | expert_hidden | dense MLP, same total params (MB) | moe grouped (MB) | moe loop (MB) | "
          "grouped / dense | loop / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for E, k, h in settings:
        mb = {}
        for kind in ('dense', 'grouped', 'loop'):
            cmd = [sys.executable, __file__, f'--memory_probe={kind}', f'--settings={E},{k},{h}',
                   f'--tokens={args.tokens}', f'--d={args.d}', f'--dtype={args.dtype}', f'--device={args.device}']
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            mb[kind] = int(out.split()[-1]) / 2 ** 20
        print(f"| {E} | {k} | {h} | {mb['dense']:.0f} | {mb['grouped']:.0f} | {mb['loop']:.0f} | "
              f"{mb['grouped'] / mb['dense']:.2f} | {mb['loop'] / mb['dense']:.2f} |")


def step_bench():
    """tokens/s of a training step: MoE GPT against the dense GPT with the same active parameters"""
    B, S, L = 8, 256, 4
    print(f"\nstep: training step (forward, backward, AdamW) of a {L}-layer llama-flavour GPT, d={args.d}, "
          f"{B}x{S} tokens, median of {args.reps} interleaved steps\n{machine()}")
    print("| E | k | expert_hidden | dense tokens/s | moe tokens/s | moe / dense |")
    print("|---|---|---|---|---|---|")
    for E, k, h in settings:
        models, opts = {}, {}
        for name, router in (('dense', 'dense'), ('moe', 'softmax')):
            torch.manual_seed(0)
            c = GPTConfig(arch='llama', block_size=S, vocab_size=8192, n_layer=L, n_head=8, n_embd=args.d, bias=False,
                          router=router, n_experts=E, top_k=k, expert_hidden=h, mlp_hidden=k * h, force_balance=True)
            models[name] = GPT(c).to(args.device)
            opts[name] = models[name].configure_optimizers(0.1, 1e-4, (0.9, 0.99), args.device.split(':')[0])
        x = torch.randint(0, 8192, (B, S), device=args.device)
        ctx = torch.autocast(args.device.split(':')[0], dtype=dtype, enabled=dtype != torch.float32)
        times = {n: [] for n in models}
        for r in range(args.reps + 2):
            for name, model in models.items():
                sync()
                t = time.perf_counter()
                with ctx:
                    _, loss = model(x, x)
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                sync()
                if r >= 2:
                    times[name].append(time.perf_counter() - t)
        tps = {n: B * S / statistics.median(v) for n, v in times.items()}
        print(f"| {E} | {k} | {h} | {tps['dense']:,.0f} | {tps['moe']:,.0f} | {tps['moe'] / tps['dense']:.2f} |")


def compile_bench():
    T, d = args.tokens, args.d
    print(f"\ncompile: torch.compile(layer) against eager, forward+backward, T={T} d={d}, median of {args.reps} "
          f"(compile time not counted)\n{machine()}")
    print("| E | k | expert_hidden | eager ms | compiled ms | compiled / eager | compile s |")
    print("|---|---|---|---|---|---|---|")
    for E, k, h in settings:
        eager = moe_layer(E, k, h)
        compiled = torch.compile(moe_layer(E, k, h))
        x = torch.randn(1, T, d, dtype=dtype, device=args.device)
        g = torch.randn(1, T, d, dtype=dtype, device=args.device)
        t0 = time.perf_counter()
        fwd_bwd(lambda x: compiled(x)[0], x, g)
        first = time.perf_counter() - t0
        t = time_all(dict(eager=lambda x: eager(x)[0], compiled=lambda x: compiled(x)[0]), x, g, args.reps)
        print(f"| {E} | {k} | {h} | {t['eager'] * 1e3:.1f} | {t['compiled'] * 1e3:.1f} | "
              f"{t['compiled'] / t['eager']:.2f} | {first:.0f} |")


def ep_bench():
    """one training step of a small sigmoid MoE at ep_size 1 and ep_size = world, and the all_to_all share"""
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
    if rank == 0:
        print(machine())
    for ep in (1, world):
        torch.manual_seed(0)
        c = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65, bias=False,
                      router='sigmoid', n_experts=8, top_k=2, ep_size=ep)
        model = GPT(c)
        if ep > 1:
            moe.set_expert_parallel(model, dist.group.WORLD)
        x = torch.randint(0, 65, (16, 128))
        sharded = {p for m in model.moe_layers() for p in m.experts.parameters()} if ep > 1 else set()
        steps = []
        for i in range(args.reps + 2):
            spent[0] = 0.0
            t = time.perf_counter()
            with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, x)
            loss.backward()
            for p in model.parameters():  # data parallelism's all-reduce (experts: only when replicated)
                if p.grad is not None and p not in sharded:
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
    if args.memory_probe:
        print(memory_probe(args.memory_probe))
    elif args.ep:
        ep_bench()
    else:
        sections = dict(layer=layer_bench, memory=memory_bench, step=step_bench, compile=compile_bench)
        for name, fn in sections.items():
            if args.only in (None, name):
                fn()
