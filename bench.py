"""
Speed and memory of the MoE layer and of a training step, as ratios measured in one run.

    python bench.py --dtype=float32        # every section (default auto: bf16 where it runs fast)
    python bench.py --only=layer --reps=15  # one section: layer, memory, step, compile
    torchrun --standalone --nproc_per_node=2 bench.py --ep   # ep_size 1 and 2, all_to_all share
    python bench.py --only=sharding --reps=2  # DDP, FSDP, FSDP + EP, each with activation checkpointing

- Ratios, not times: a machine is noisy and differs from the next, so every table compares paths run
  side by side in one process (timings interleaved, the median of --reps kept), and the machine is
  printed above every table. Nothing here is asserted in a test.
- layer: forward + backward of one MoE layer (llama flavour, softmax top-k) for each (E, k,
  expert_hidden): the grouped and the loop expert paths against a dense SwiGLU MLP with the same
  active FLOPs and against transformers' MixtralSparseMoeBlock holding the same weights.
- memory: peak of forward + backward against a dense MLP with the same total parameters, each in a
  fresh process (CPU: peak resident set from /proc; CUDA: max_memory_allocated).
- step: a training step of a small GPT, MoE against dense with the same active parameters; the MoE
  routes with the router's own choices (what a run gets) and with force_balance (as Megatron's and
  torchtitan's benchmarks: the step measures the layer, not what a router learned).
  compile: torch.compile(layer) against eager.
- sharding: per rank of 2 processes (gloo), the peak resident set, the bytes of parameters, gradients
  and AdamW state it holds, and tokens/s, for DDP, FSDP and FSDP with ep_size 2, each without and
  with activation checkpointing, each in fresh processes; for train.py's default model with the
  sigmoid router and for SmolLM2-135M's architecture upcycled to 4 experts.
- The numbers and their machines: docs/performance.md.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import fsdp
import moe
from model import GPT, GPTConfig, MLP

# -----------------------------------------------------------------------------
# settings: python bench.py [--key=value ...]
DEFAULTS = dict(
    tokens=4096,  # tokens per forward (layer, memory, compile)
    d=512,  # model width
    settings='8,2,1024 64,8,128',  # space-separated E,k,expert_hidden triples
    dtype='auto',  # auto (bf16 where the hardware runs it fast, else float32), float32 or bfloat16
    reps=7,  # timed repetitions of each path, after two warm-up ones; the median is kept
    only='',  # one section: layer, memory, step or compile; '' = all of them
    device='auto',  # 'auto' = cuda where torch sees a GPU, else cpu
    ep=False,  # under torchrun: a training step at ep_size 1 and ep_size = world
    memory_probe='',  # internal: one memory measurement (dense, grouped, loop) in this process
    layout='',  # internal, under torchrun: one sharding measurement, 'LAYOUT,RECOMPUTE,MODEL'
)
# the allowed values of the settings (cli.problem); --settings is checked below
LIMITS = dict(tokens='>= 1', d='>= 1', settings='text', dtype=('auto', 'float32', 'bfloat16'),
              reps='>= 1', only=('', 'layer', 'memory', 'step', 'compile', 'sharding'),
              device='text', memory_probe=('', 'dense', 'grouped', 'loop'), layout='text')
SECTIONS = LIMITS['only'][1:]

with cli.errors('bench.py'):
    args = types.SimpleNamespace(**cli.configure(DEFAULTS, sys.argv[1:], limits=LIMITS))
    try:
        settings = [tuple(int(v) for v in s.split(',')) for s in args.settings.split()]
    except ValueError:
        settings = []
    if not settings or not all(len(s) == 3 and 1 <= s[1] <= s[0] and s[2] > 0 for s in settings):
        raise ValueError(f"--settings={args.settings!r}: give E,k,expert_hidden triples, "
                         f"1 <= k <= E: '8,2,1024 64,8,128'")
    device = cli.pick_device(args.device)
    device_type = device.split(':')[0]
    dtype_name, why = cli.pick_dtype(args.dtype, device_type)
if why:
    print(f"dtype auto -> {dtype_name}: {why}")
dtype = cli.DTYPES[dtype_name]


def machine():
    """one line naming the hardware, threads, torch and dtype"""
    if device.startswith('cuda'):
        hw = torch.cuda.get_device_name()
    else:
        info = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
        lines = info.splitlines()
        model = next((ln.split(':', 1)[1].strip() for ln in lines if ln.startswith('model name')),
                     platform.processor())
        flags = next((ln.split(':', 1)[1].split() for ln in lines if ln.startswith('flags')), [])
        simd = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
        hw = f"{model} ({', '.join(simd) or 'no AVX2'}), {os.cpu_count()} cores"
    threads = torch.get_num_threads()
    return f"machine: {hw}; {threads} threads; torch {torch.__version__}; {dtype_name}"


def sync():
    if device.startswith('cuda'):
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
    return GPTConfig(arch='llama', n_embd=args.d, n_head=8, bias=False, router='softmax',
                     n_experts=E, top_k=k, expert_hidden=h, mlp_hidden=k * h, aux_loss_coef=0.0,
                     z_loss_coef=0.0, **kw)


def moe_layer(E, k, h, impl='auto'):
    torch.manual_seed(0)
    layer = moe.MoE(layer_config(E, k, h, expert_impl=impl), h)
    torch.nn.init.normal_(layer.experts.c_fc, std=0.02)
    torch.nn.init.normal_(layer.experts.c_proj, std=0.02)
    layer = layer.to(device, dtype)
    layer.router.float()  # router math stays in float32
    return layer


def mixtral_block(layer, E, k, h, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    c = MixtralConfig(hidden_size=args.d, intermediate_size=h, num_local_experts=E,
                      num_experts_per_tok=k)
    c._experts_implementation = impl
    hf = MixtralSparseMoeBlock(c).to(device, dtype)
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
    print(f"\nlayer: T={T} d={d}, forward+backward, median of {args.reps} interleaved runs; "
          f"ratios to the dense SwiGLU MLP with the same active FLOPs (hidden k * expert_hidden)"
          f"\n{machine()}")
    print("| E | k | expert_hidden | dense ms | moe (auto) | moe grouped | moe loop "
          "| mixtral eager | mixtral grouped_mm | mixtral eager / moe (auto) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for E, k, h in settings:
        auto = moe_layer(E, k, h)
        grouped = moe_layer(E, k, h, 'grouped')
        loop = moe_layer(E, k, h, 'loop')
        dense = MLP(layer_config(E, k, h)).to(device, dtype)
        x = torch.randn(1, T, d, dtype=dtype, device=device)
        g = torch.randn(1, T, d, dtype=dtype, device=device)
        fns = dict(dense=lambda x: dense(x)[0], auto=lambda x: auto(x)[0],
                   grouped=lambda x: grouped(x)[0], loop=lambda x: loop(x)[0],
                   mixtral_eager=mixtral_block(grouped, E, k, h, 'eager'),
                   mixtral_grouped=mixtral_block(grouped, E, k, h, 'grouped_mm'))
        t = time_all(fns, x, g, args.reps)
        r = {n: v / t['dense'] for n, v in t.items()}
        print(f"| {E} | {k} | {h} | {t['dense'] * 1e3:.1f} | {r['auto']:.2f} | "
              f"{r['grouped']:.2f} | {r['loop']:.2f} | {r['mixtral_eager']:.2f} | "
              f"{r['mixtral_grouped']:.2f} | {t['mixtral_eager'] / t['auto']:.2f}x |")


def memory_probe(kind):
    """one forward + backward in this (fresh) process -> peak bytes above the set-up"""
    E, k, h = settings[0]
    T, d = args.tokens, args.d
    torch.manual_seed(0)
    if kind == 'dense':
        # hidden E * h: the MoE layer's total parameters
        net = MLP(layer_config(E, E, h)).to(device, dtype)
        fn = lambda x: net(x)[0]  # noqa: E731
    else:
        net = moe_layer(E, k, h, kind)
        fn = lambda x: net(x)[0]  # noqa: E731
    x = torch.randn(1, T, d, dtype=dtype, device=device)
    g = torch.randn(1, T, d, dtype=dtype, device=device)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, x, g)
        return torch.cuda.max_memory_allocated() - base
    # Linux: reset the peak resident set (VmHWM) to the current one
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    base = resident('VmRSS')
    fwd_bwd(fn, x, g)
    return resident('VmHWM') - base


def resident(field):
    """bytes of this process's resident set now (VmRSS) or at its peak (VmHWM), from
    /proc/self/status"""
    line = next(ln for ln in open('/proc/self/status') if ln.startswith(field + ':'))
    return int(line.split()[1]) * 1024


def memory_bench():
    print(f"\nmemory: peak of one forward+backward above the set-up (parameters, input), each in a "
          f"fresh process; T={args.tokens} d={args.d}\n{machine()}")
    print("| E | k | expert_hidden | dense MLP, same total params (MB) | moe grouped (MB) "
          "| moe loop (MB) | grouped / dense | loop / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for E, k, h in settings:
        mb = {}
        for kind in ('dense', 'grouped', 'loop'):
            cmd = [sys.executable, __file__, f'--memory_probe={kind}', f'--settings={E},{k},{h}',
                   f'--tokens={args.tokens}', f'--d={args.d}', f'--dtype={dtype_name}',
                   f'--device={device}']
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            mb[kind] = int(out.split()[-1]) / 2 ** 20
        print(f"| {E} | {k} | {h} | {mb['dense']:.0f} | {mb['grouped']:.0f} | {mb['loop']:.0f} | "
              f"{mb['grouped'] / mb['dense']:.2f} | {mb['loop'] / mb['dense']:.2f} |")


def step_bench():
    """tokens/s of a training step: MoE GPT (the router's own choices, and force_balance) against
    the dense GPT with the same active parameters, the three interleaved"""
    B, S, L = 8, 256, 4
    print(f"\nstep: training step (forward, backward, AdamW) of a {L}-layer llama-flavour GPT, "
          f"d={args.d}, {B}x{S} tokens, median of {args.reps} interleaved steps; moe: softmax "
          f"top-k with the router's choices, forced: the same with force_balance\n{machine()}")
    print("| E | k | expert_hidden | dense tokens/s | moe tokens/s | moe / dense | forced tokens/s "
          "| forced / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for E, k, h in settings:
        models, opts = {}, {}
        for name, router, forced in (('dense', 'dense', False), ('moe', 'softmax', False),
                                     ('forced', 'softmax', True)):
            torch.manual_seed(0)
            c = GPTConfig(arch='llama', block_size=S, vocab_size=8192, n_layer=L, n_head=8,
                          n_embd=args.d, bias=False, router=router, n_experts=E, top_k=k,
                          expert_hidden=h, mlp_hidden=k * h, force_balance=forced)
            models[name] = GPT(c).to(device)
            opts[name] = models[name].configure_optimizers(0.1, 1e-4, (0.9, 0.99), device_type)
        x = torch.randint(0, 8192, (B, S), device=device)
        ctx = cli.autocast(device_type, dtype_name)
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
        print(f"| {E} | {k} | {h} | {tps['dense']:,.0f} | {tps['moe']:,.0f} | "
              f"{tps['moe'] / tps['dense']:.2f} | {tps['forced']:,.0f} | "
              f"{tps['forced'] / tps['dense']:.2f} |")


def compile_bench():
    T, d = args.tokens, args.d
    print(f"\ncompile: torch.compile(layer) against eager, forward+backward, T={T} d={d}, "
          f"median of {args.reps} (compile time not counted)\n{machine()}")
    print("| E | k | expert_hidden | eager ms | compiled ms | compiled / eager | compile s |")
    print("|---|---|---|---|---|---|---|")
    for E, k, h in settings:
        eager = moe_layer(E, k, h)
        compiled = torch.compile(moe_layer(E, k, h))
        x = torch.randn(1, T, d, dtype=dtype, device=device)
        g = torch.randn(1, T, d, dtype=dtype, device=device)
        t0 = time.perf_counter()
        fwd_bwd(lambda x: compiled(x)[0], x, g)
        first = time.perf_counter() - t0
        fns = dict(eager=lambda x: eager(x)[0], compiled=lambda x: compiled(x)[0])
        t = time_all(fns, x, g, args.reps)
        print(f"| {E} | {k} | {h} | {t['eager'] * 1e3:.1f} | {t['compiled'] * 1e3:.1f} | "
              f"{t['compiled'] / t['eager']:.2f} | {first:.0f} |")


# the sharding section's models: train.py's default with configs/sigmoid.py, and SmolLM2-135M's
# architecture upcycled to 4 experts (8 would need 2 x 14 GB under DDP, more than a 24 GB machine)
SHARDING_MODELS = dict(
    default=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65, bias=False,
                 router='sigmoid', n_experts=8, top_k=2, batch=16),
    smollm2_4x=dict(arch='llama', n_layer=30, n_head=9, n_kv_head=3, n_embd=576, mlp_hidden=1536,
                    block_size=128, vocab_size=49152, bias=False, router='sigmoid', n_experts=4,
                    top_k=2, batch=2),
)
LAYOUTS = ('ddp', 'fsdp', 'fsdp_ep')
# LibMoE-sized upcycled models whose memory per GPU the sharding section computes from the bytes per
# parameter it measures: (name, llama-flavour GPTConfig fields)
PHI35 = dict(n_layer=32, n_head=32, n_embd=3072, mlp_hidden=8192, vocab_size=32064,
             tie_embeddings=False)
SMOLLM2_17B = dict(n_layer=24, n_head=32, n_embd=2048, mlp_hidden=8192, vocab_size=49152)
LIBMOE_MODELS = (('Phi-3.5-mini upcycled, 4 experts (LibMoE v1)', PHI35 | dict(n_experts=4)),
                 ('Phi-3.5-mini upcycled, 6 experts top-3 (LibMoE v2)',
                  PHI35 | dict(n_experts=6, top_k=3)),
                 ('SmolLM2-1.7B upcycled, 8 experts', SMOLLM2_17B | dict(n_experts=8)))


def layout_probe(spec):
    """under torchrun: training steps of one model in one layout -> rank 0 prints, per rank, the
    peak resident bytes, the bytes of parameters, gradients and AdamW state held, and tokens/s"""
    layout, recompute, name = spec.split(',')
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    kw = dict(SHARDING_MODELS[name])
    B, S = kw.pop('batch'), kw['block_size']
    ep = world if layout == 'fsdp_ep' else 1
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kw, ep_size=ep, activation_checkpointing=recompute))
    if layout == 'ddp':
        warnings.filterwarnings('ignore', '`broadcast_buffers` is deprecated')
        trained = DDP(model, broadcast_buffers=False)
    else:
        dense_mesh, expert_mesh, ep_group, _ = fsdp.meshes('cpu', world, ep)
        if ep > 1:
            moe.set_expert_parallel(model, ep_group)
        # as train.py shards it: bf16 gathers where autocast would compute in bf16
        trained = fsdp.shard(model, dense_mesh, expert_mesh, compute_dtype=dtype)
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), 'cpu')
    x = torch.randint(0, kw['vocab_size'], (B, S), generator=torch.Generator().manual_seed(rank))
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    times = []
    for i in range(args.reps + 1):
        t = time.perf_counter()
        with cli.autocast('cpu', dtype_name):
            _, loss = trained(x, x)
        loss.backward()
        opt.step()
        if i == args.reps:
            # parameters, gradients and AdamW state of this rank (an FSDP shard's local part)
            held = sum(fsdp.local(v).nbytes for p in model.parameters()
                       for v in (p, p.grad, *opt.state[p].values())
                       if v is not None and torch.is_tensor(v))
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    mine = [resident('VmHWM'), held, B * S / statistics.median(times)]
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        print(json.dumps(every))
    dist.destroy_process_group()


def sharding_bench():
    print(f"\nsharding: per rank of 2 processes (gloo), {args.reps} timed training steps "
          f"(forward, backward, AdamW), each layout in fresh processes\n{machine()}")
    print("| model | layout | activation checkpointing | peak resident MB (max rank) | "
          "parameters + grads + AdamW MB (rank 0) | tokens/s per rank | tokens/s / DDP's |")
    print("|---|---|---|---|---|---|---|")
    held = {}  # layout -> bytes of parameters, gradients and AdamW state per rank
    for name in SHARDING_MODELS:
        ddp_speed = None
        for layout in LAYOUTS:
            for recompute in ('none', 'block'):
                cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                       '--nproc_per_node=2', __file__, f'--layout={layout},{recompute},{name}',
                       f'--reps={args.reps}', f'--dtype={dtype_name}', '--device=cpu']
                env = {**os.environ, 'OMP_NUM_THREADS': '1'}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                every = json.loads(out.stdout.strip().splitlines()[-1])
                speed = statistics.mean(r[2] for r in every)
                ddp_speed = ddp_speed or speed
                print(f"| {name} | {layout} | {recompute} | "
                      f"{max(r[0] for r in every) / 2 ** 20:,.0f} | {every[0][1] / 2 ** 20:,.0f} | "
                      f"{speed:,.0f} | {speed / ddp_speed:.2f} |", flush=True)
                if name == 'default' and recompute == 'none':
                    held[layout] = sum(r[1] for r in every) / len(every)
    # bytes per parameter and rank as measured on the default model, applied to LibMoE's sizes
    kw = dict(SHARDING_MODELS['default'])
    kw.pop('batch')
    n = sum(p.numel() for p in GPT(GPTConfig(**kw)).parameters())
    ddp_b, fsdp_b = held['ddp'] / n, held['fsdp'] * 2 / n
    print(f"\nmeasured: {ddp_b:.1f} bytes per parameter on every DDP rank; {fsdp_b:.1f} bytes per "
          f"parameter over the FSDP ranks together ({held['fsdp_ep'] * 2 / n:.1f} with ep_size 2)."
          f"\nComputed from them (weights, gradients, AdamW state; no activations), per GPU of 4:")
    print("| model | parameters | DDP | DDP + ep_size 4 | FSDP (+ EP) over 4 |")
    print("|---|---|---|---|---|")
    for title, fields in LIBMOE_MODELS:
        with torch.device('meta'):
            m = GPT(GPTConfig(arch='llama', bias=False, router='softmax', **fields))
        total = sum(p.numel() for p in m.parameters())
        experts = sum(p.numel() for layer in m.moe_layers() for p in layer.experts.parameters())
        E = fields['n_experts']
        ep = 4 if E % 4 == 0 else 2
        with_ep = (f"{ddp_b * (total - experts + experts / ep) / 1e9:,.0f} GB"
                   + ('' if ep == 4 else f" (ep_size 2: {E} % 4 != 0)"))
        print(f"| {title} | {total / 1e9:.1f}B | {ddp_b * total / 1e9:,.0f} GB | {with_ep} | "
              f"{fsdp_b * total / 4 / 1e9:,.0f} GB |")


def ep_bench():
    """one training step of a small sigmoid MoE at ep_size 1 and ep_size = world, and the
    all_to_all share"""
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
        sharded = set()
        if ep > 1:
            sharded = {p for m in model.moe_layers() for p in m.experts.parameters()}
        steps = []
        for i in range(args.reps + 2):
            spent[0] = 0.0
            t = time.perf_counter()
            with cli.autocast('cpu', dtype_name):
                _, loss = model(x, x)
            loss.backward()
            # data parallelism's all-reduce (experts: only when replicated)
            for p in model.parameters():
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
    elif args.layout:
        layout_probe(args.layout)
    elif args.ep:
        ep_bench()
    else:
        sections = dict(layer=layer_bench, memory=memory_bench, step=step_bench,
                        compile=compile_bench, sharding=sharding_bench)
        for name, fn in sections.items():
            if args.only in ('', name):
                fn()
