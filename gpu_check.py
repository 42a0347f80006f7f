"""
The GPU check, one command on one CUDA GPU, under 8 minutes:
$ python gpu_check.py
It measures what the CPU tests can only assume, and prints one table, each check PASS, FAIL or INFO
(a measurement) with its number:
- paths: which expert path `expert_impl='auto'` takes here per dtype, and why (moe.expert_path);
- experts: the grouped and loop paths against each other and a naive per-expert loop, float32, bf16
  autocast and bf16 weights, the output and every gradient, three experts with no rows (their
  weight gradients must be exactly 0); torch.compile's graph of the bf16 experts;
- syncs: host syncs in one training step (torch.cuda.set_sync_debug_mode('warn')), an MoE GPT's
  minus a dense GPT's, per MoE layer, against the count moe.MoE.routed documents; and train.py's
  own, by line, none in copying the micro-batches;
- kernels: the ops and CUDA kernels of the experts' forward + backward (torch.profiler);
- train: train.py in bf16 without and with compile=True, deterministic topp, and a 1-GPU torchrun
  over NCCL; bench.py's layer ratios; the MFU of configs/gpu.py's model for a few steps (random
  tokens of GPT-2's vocabulary: the speed does not depend on the text).
The functions take a device, so the comparisons also run on CPU (tests/test_gpu_path.py).
"""
import ast
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import moe
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent
# relative error (max |got - want| / max |want|) allowed against the float32 naive loop
TOLERANCE = {'float32': 1e-4, 'bf16 autocast': 3e-2, 'bf16 weights': 3e-2}
# rows per expert: three experts get none
COUNTS = [0, 37, 0, 100, 5, 0, 64, 50]


def row(check, status, number, detail=''):
    return dict(check=check, status=status, number=number, detail=detail)


def verdict(ok):
    return 'PASS' if ok else 'FAIL'


def rel_error(got, want):
    """max |got - want| over max |want|, in float32; a gradient missing on one side only: inf"""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float('inf')
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()

# -----------------------------------------------------------------------------
# the expert paths


def paths(device):
    return [row(f'path auto, {dt}', 'INFO', 'grouped_mm' if g else 'loop', why)
            for dt in (torch.bfloat16, torch.float16, torch.float32)
            for g, why in [moe.expert_path('auto', device, dt, (512, 128))]]


def expert_case(arch, device, d=256, hidden=128):
    """experts with random weights (biases for gpt2), sorted rows x, counts, combine weights w"""
    cfg = GPTConfig(n_embd=d, n_head=4, arch=arch, bias=arch == 'gpt2', router='softmax',
                    n_experts=len(COUNTS), top_k=2, expert_hidden=hidden)
    g = torch.Generator().manual_seed(0)
    experts = moe.Experts(cfg, len(COUNTS), hidden)
    with torch.no_grad():
        for name, p in experts.named_parameters():
            scale = 0.1 if name.startswith('b_') else d ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    N = sum(COUNTS)
    x = torch.randn(N, d, generator=g)
    w = torch.rand(N, generator=g)
    return experts.to(device), torch.tensor(COUNTS, device=device), x.to(device), w.to(device)


def naive(params, x, counts, w, arch):
    """the reference: per expert, its rows times its matrices, written out in float32"""
    ys, start = [], 0
    for e, n in enumerate(counts):
        xe, we = x[start:start + n], w[start:start + n, None]
        h = xe @ params['c_fc'][e].t() + (params['b_fc'][e] if 'b_fc' in params else 0)
        if arch == 'gpt2':
            a = F.gelu(h, approximate='tanh')
        else:
            gate, up = h[:, :h.shape[1] // 2], h[:, h.shape[1] // 2:]
            a = gate * torch.sigmoid(gate) * up
        y = (a * we) @ params['c_proj'][e].t()
        ys.append(y + (params['b_proj'][e] * we if 'b_proj' in params else 0))
        start += n
    return torch.cat(ys)


def run_experts(experts, impl, mode, x, counts, w, g_y):
    """output and gradients {name: tensor} of the experts on impl's path in mode"""
    experts.impl = impl
    experts.zero_grad(set_to_none=True)
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=mode == 'bf16 autocast'):
        y = experts(x, counts, w)
    (y.float() * g_y).sum().backward()
    return {'output': y.detach(), 'grad x': x.grad, 'grad w': w.grad,
            **{f'grad {n}': p.grad for n, p in experts.named_parameters()}}


def compare_paths(device, d=256, hidden=128):
    """the grouped and loop paths against the naive loop and each other, each mode and flavour"""
    rows = []
    for mode in TOLERANCE:
        for arch in ('llama', 'gpt2'):
            experts, counts, x, w = expert_case(arch, device, d, hidden)
            if mode == 'bf16 weights':
                experts, x, w = experts.bfloat16(), x.bfloat16(), w.bfloat16()
            g_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
            # the reference sees the same (possibly bf16-rounded) values, in float32
            params = {n: p.detach().float().requires_grad_() for n, p in experts.named_parameters()}
            xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
            yr = naive(params, xr, COUNTS, wr, arch)
            (yr * g_y).sum().backward()
            want = {'output': yr.detach(), 'grad x': xr.grad, 'grad w': wr.grad,
                    **{f'grad {n}': p.grad for n, p in params.items()}}
            got = {impl: run_experts(experts, impl, mode, x, counts, w, g_y)
                   for impl in ('grouped', 'loop')}
            pairs = [('grouped', want, got['grouped']), ('loop', want, got['loop']),
                     ('grouped vs loop', got['loop'], got['grouped'])]
            worst, where = 0.0, ''
            for label, ref, out in pairs:
                for k in ref:
                    err = rel_error(out[k], ref[k])
                    if err > worst:
                        worst, where = err, f'{label}: {k}'
            rows.append(row(f'experts {mode}, {arch}', verdict(worst <= TOLERANCE[mode]),
                            f'{worst:.1e}', f'worst {where} (tolerance {TOLERANCE[mode]:g})'))
            empty = [e for e, n in enumerate(COUNTS) if n == 0]
            nonzero = [f'{impl} {k}' for impl, out in got.items() for k, v in out.items()
                       if k.startswith('grad c_') or k.startswith('grad b_')
                       if v is None or (v[empty] != 0).any()]
            rows.append(row(f'empty experts {mode}, {arch}', verdict(not nonzero),
                            len(nonzero), ', '.join(nonzero) or 'weight grads exactly 0'))
    return rows


def compile_graph(device):
    """dynamo's graph of the bf16 experts on the path auto takes: no break, grouped_mm inside"""
    experts, counts, x, w = expert_case('llama', device)
    experts, x = experts.bfloat16(), x.bfloat16()
    experts.impl = 'auto'
    grouped = experts.path(x.device, torch.bfloat16)[0]
    torch._dynamo.reset()
    ex = torch._dynamo.explain(experts)(x, counts)
    calls = sum('grouped_mm' in str(n.target) for g in ex.graphs for n in g.graph.nodes)
    reasons = [str(b.reason).splitlines()[0] for b in ex.break_reasons]
    torch._dynamo.reset()
    # on the grouped path both grouped_mm calls must be in one graph; the loop path: INFO
    status = verdict(not reasons and calls == 2) if grouped else 'INFO'
    detail = f"{calls} grouped_mm in the graph; {'; '.join(reasons) or 'no break'}"
    return [row('compile: bf16 experts, graph breaks', status, len(reasons), detail)]

# -----------------------------------------------------------------------------
# host syncs and kernels


def step_model(device, router, impl, n_layer=4):
    cfg = GPTConfig(block_size=256, vocab_size=8192, n_layer=n_layer, n_head=8, n_embd=512,
                    arch='llama', router=router, n_experts=8, top_k=2, expert_hidden=512,
                    expert_impl=impl, router_options=moe.router_settings())
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device.type)
    idx = torch.randint(0, 8192, (8, 257), device=device)
    return model, opt, idx


def count_syncs(device, router, impl):
    """host syncs in one bf16 training step (forward, backward, AdamW, end_step) after two warm-up
    steps -> (count, the Python lines that caused them)"""
    model, opt, idx = step_model(device, router, impl)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        moe.end_step(model)

    step()
    step()
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    syncs = [w for w in caught if 'synchroniz' in str(w.message)]
    where = collections.Counter(f'{Path(w.filename).name}:{w.lineno}' for w in syncs)
    return len(syncs), where


def expected_syncs(grouped, all_ffn):
    """per MoE layer and forward, as moe.MoE.routed's docstring counts them (dropless, one
    process): the loop's rows per expert, and the count where a routing is not all_ffn"""
    return (0 if grouped else 1) + (0 if all_ffn else 1)


def syncs(device):
    dense, _ = count_syncs(device, 'dense', 'auto')
    rows = [row('syncs per step: dense GPT', 'INFO', dense, 'the baseline (4 layers)')]
    for router, all_ffn in (('softmax', True), ('topp', False)):
        for impl in ('auto', 'loop'):
            n, where = count_syncs(device, router, impl)
            grouped = moe.expert_path(impl, device, torch.bfloat16, (512, 512))[0]
            per_layer = (n - dense) / 4
            want = expected_syncs(grouped, all_ffn)
            top = ', '.join(f'{k} x{v}' for k, v in where.most_common(4))
            rows.append(row(f"syncs per MoE layer: {router}, {impl} "
                            f"({'grouped_mm' if grouped else 'loop'})",
                            verdict(per_layer == want), f'{per_layer:g}',
                            f'documented {want}; {top}'))
    return rows


def kernels(device):
    """ops and CUDA kernels of the bf16 experts' forward + backward on the auto path"""
    experts, counts, x, w = expert_case('llama', device, d=512, hidden=512)
    experts, x, w = experts.bfloat16(), x.bfloat16(), w.bfloat16()
    experts.impl = 'auto'
    grouped = experts.path(device, torch.bfloat16)[0]
    for _ in range(2):
        experts(x, counts, w).float().sum().backward()
    torch.cuda.synchronize(device)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        experts(x, counts, w).float().sum().backward()
        torch.cuda.synchronize(device)
    events = prof.key_averages()
    ops = {e.key: e.count for e in events if e.key in ('aten::_grouped_mm', 'aten::mm')}
    gemms = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                    and re.search(r'gemm|cutlass|grouped|sm90|sm100|xmma', e.key, re.I)),
                   key=lambda e: -e.self_device_time_total)
    names = '; '.join(f'{e.key[:60]} x{e.count}' for e in gemms[:4])
    rows = [row('kernels: ops', 'INFO', json.dumps(ops), names or 'no gemm kernel matched')]
    if grouped:
        # the fused path: grouped_mm for fc, proj and their gradients, no per-group mm fallback
        ok = ops.get('aten::_grouped_mm', 0) >= 2 and ops.get('aten::mm', 0) == 0
        rows.append(row('kernels: fused grouped_mm, no per-group mm', verdict(ok),
                        ops.get('aten::mm', 0), 'aten::mm calls (the fallback loop)'))
    return rows

# -----------------------------------------------------------------------------
# train.py, torchrun, bench.py


def run(cmd, cwd, timeout, deadline):
    """(exit status, output, seconds); 124 and the output so far when it ran past timeout seconds
    or the check's deadline (time.time() by which everything must be done). A command that runs
    too long gets SIGTERM first: torchrun passes it on to its ranks, which run in sessions of
    their own (a SIGKILL would leave them holding the GPU); then SIGKILL for what is left."""
    began = time.time()
    timeout = max(1, min(timeout, deadline - began))
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, 'PYTHONUNBUFFERED': '1'}, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out, time.time() - began
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, _ = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        return 124, f'{out}\n(stopped after {timeout:.0f} s)', time.time() - began


def log_rows(out_dir):
    path = Path(out_dir) / 'log.jsonl'
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if 'loss' in r]


def last_line(text, prefix):
    return next((line for line in reversed(text.splitlines()) if line.startswith(prefix)), '')


def train_runs(tmp, deadline):
    """a tiny GPT (softmax MoE, default sizes) for 30 steps in bf16: eager, compiled, deterministic
    topp, and under a 1-GPU torchrun (NCCL)"""
    base = [str(REPO / 'configs' / 'softmax.py'), '--device=cuda', '--dtype=bfloat16',
            '--max_iters=30', '--eval_interval=30', '--eval_iters=2', '--log_interval=10']
    runs = {'eager': [sys.executable, str(REPO / 'train.py'), *base],
            'compile': [sys.executable, str(REPO / 'train.py'), *base, '--compile=True'],
            'deterministic topp': [sys.executable, str(REPO / 'train.py'),
                                   str(REPO / 'configs' / 'topp.py'), *base[1:],
                                   '--deterministic=True'],
            'torchrun nccl': [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                              '--nproc_per_node=1', str(REPO / 'train.py'), *base]}
    rows = []
    for name, cmd in runs.items():
        out_dir = Path(tmp) / name.replace(' ', '_')
        limit = 150 if name == 'compile' else 90
        rc, out, took = run([*cmd, f'--out_dir={out_dir}'], tmp, limit, deadline)
        losses = [r['loss'] for r in log_rows(out_dir)]
        ok = rc == 0 and len(losses) >= 2 and all(np.isfinite(losses)) and losses[-1] < losses[0]
        speed = re.search(r'[\d,]+ tok/s', last_line(out, 'iter 30:'))
        detail = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {speed and speed.group()}, "
                  f"{took:.0f} s; {last_line(out, 'experts:')}") if ok else out.strip()[-200:]
        if name == 'torchrun nccl':
            warned = [line for line in out.splitlines() if 'device_id' in line or 'barrier' in line]
            ok = ok and not warned
            detail = f'{detail}; {warned[0][:80]}' if warned else detail
        rows.append(row(f'train: {name}', verdict(ok), f'{losses[-1]:.4f}' if losses else rc,
                        detail))
    return rows


# train.py as a program under torch.cuda.set_sync_debug_mode('warn'): one warning line per sync
SYNC_DEBUG = ("import os, runpy, sys, torch; torch.cuda.set_sync_debug_mode('warn'); "
              "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


def function_lines(path, name):
    """the lines of the function name in the Python file path"""
    tree = ast.parse(Path(path).read_text())
    f = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return range(f.lineno, f.end_lineno + 1)


def sync_sites(out):
    """(file name, line) of each sync warning in a program's output (python -W always)"""
    return [(Path(f).name, int(n)) for f, n in
            re.findall(r'^(.*?):(\d+): UserWarning: called a synchronizing', out, re.M)]


def train_syncs(tmp, deadline):
    """where train.py's host syncs come from in 20 bf16 steps (softmax MoE, one evaluation at
    iter 0, one log line); none may come from copying the micro-batches (get_batch: pinned
    memory, non_blocking)"""
    out_dir = Path(tmp) / 'syncs'
    cmd = [sys.executable, '-W', 'always::UserWarning', '-c', SYNC_DEBUG, str(REPO / 'train.py'),
           str(REPO / 'configs' / 'softmax.py'), '--device=cuda', '--dtype=bfloat16',
           '--max_iters=20', '--eval_interval=1000', '--eval_iters=1', '--log_interval=20',
           f'--out_dir={out_dir}']
    rc, out, took = run(cmd, tmp, 90, deadline)
    found = sync_sites(out)
    batch = function_lines(REPO / 'train.py', 'get_batch')
    copies = sum(1 for f, n in found if f == 'train.py' and n in batch)
    top = ', '.join(f'{f}:{n} x{c}' for (f, n), c in collections.Counter(found).most_common(5))
    ok = rc == 0 and bool(log_rows(out_dir)) and copies == 0
    detail = (f'{len(found)} syncs in all, {took:.0f} s; {top}' if rc == 0
              else out.strip()[-200:])
    return [row('syncs: train.py, in get_batch', verdict(ok), copies, detail)]


def bench_layer(tmp, deadline):
    """bench.py's layer section in bf16: a row per (E, k, expert_hidden), ratios to the dense MLP"""
    rc, out, took = run([sys.executable, str(REPO / 'bench.py'), '--only=layer', '--device=cuda',
                         '--dtype=bfloat16', '--reps=7'], tmp, 120, deadline)
    table = [[c.strip() for c in line.strip(' |').split('|')] for line in out.splitlines()
             if line.startswith('| ') and '---' not in line]
    machine = last_line(out, 'machine:')
    rows = [row('bench layer', verdict(rc == 0 and len(table) > 1), f'{took:.0f} s',
                machine if rc == 0 else out.strip()[-200:])]
    for cells in table[1:]:
        named = dict(zip(table[0], cells))
        setting = ', '.join(f'{k} {named.pop(k, "?")}' for k in ('E', 'k', 'expert_hidden'))
        rows.append(row(f'bench layer: {setting}', 'INFO', named.pop('moe (auto)', ''),
                        '; '.join(f'{k} {v}' for k, v in named.items())))
    return rows


def mfu(tmp, deadline):
    """configs/gpu.py's model (GPT-2 small shape, vocab 50257, bf16, compiled) for a few steps on
    random tokens, MFU against cli.GPU_PEAKS"""
    data = Path(tmp) / 'data' / 'gpu_check_gpt2'
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', 2_000_000), ('val', 200_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data / f'{split}.bin')
    meta = dict(tokenizer='gpt2', vocab_size=50257, dtype='uint16', train_tokens=2_000_000,
                val_tokens=200_000)
    (data / 'meta.json').write_text(json.dumps(meta))
    out_dir = Path(tmp) / 'mfu'
    configs = [str(REPO / 'configs' / f'{name}.py') for name in ('sigmoid', 'gpu')]
    rc, out, took = run([sys.executable, str(REPO / 'train.py'), *configs,
                         '--dataset=gpu_check_gpt2',
                         '--gradient_accumulation_steps=4', '--max_iters=20',
                         '--eval_interval=1000', '--eval_iters=1', '--log_interval=10',
                         '--save_optimizer=False', f'--out_dir={out_dir}'], tmp, 240, deadline)
    rows = log_rows(out_dir)
    value = rows[-1].get('mfu') if rows else None
    detail = (f"{rows[-1]['tokens_per_s']:,.0f} tok/s at iter 20 (after compiling), {took:.0f} s; "
              f"{last_line(out, 'experts:')}") if rows else out.strip()[-200:]
    if value is None:
        return [row('MFU configs/gpu.py (sigmoid, 4 x 16 x 1024 tokens)', verdict(False), rc,
                    'no mfu: the GPU model is not in cli.GPU_PEAKS or the run failed; ' + detail)]
    return [row('MFU configs/gpu.py (sigmoid, 4 x 16 x 1024 tokens)', verdict(rc == 0),
                f'{value * 100:.1f}%', detail)]

# -----------------------------------------------------------------------------


def table(rows):
    """one Markdown table of every row"""
    def cell(v):
        # a subprocess's output tail, multi-line, in one cell
        return ' / '.join(str(v).split('\n')).replace('|', '\\|')

    lines = ['| check | status | number | detail |', '|---|---|---|---|']
    lines += ['| ' + ' | '.join(cell(r[k]) for k in ('check', 'status', 'number', 'detail')) + ' |'
              for r in rows]
    return '\n'.join(lines)


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: torch sees no CUDA device: run it on a GPU machine "
                 "(the CPU parts are tests/test_gpu_path.py)")
    device = torch.device('cuda', 0)
    props = torch.cuda.get_device_properties(device)
    print(f"{props.name}, sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    started, rows = time.time(), []
    # every subprocess stops by then: the whole check stays under 8 minutes
    deadline = started + 450
    with tempfile.TemporaryDirectory() as tmp:
        for check in (paths, compare_paths, compile_graph, syncs, kernels):
            rows += check(device)
            print(f"  {check.__name__} done ({time.time() - started:.0f} s)", flush=True)
        # the subprocesses get the GPU's memory that this process's checks held
        torch.cuda.empty_cache()
        for check in (train_runs, train_syncs, bench_layer, mfu):
            rows += check(tmp, deadline)
            print(f"  {check.__name__} done ({time.time() - started:.0f} s)", flush=True)
    print(table(rows))
    failed = [r['check'] for r in rows if r['status'] == 'FAIL']
    print(f"{len(rows) - len(failed)} of {len(rows)} rows pass or inform, {len(failed)} fail; "
          f"{time.time() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
