"""What runs where on a GPU, checked on CPU with torch.cuda's device queries mocked: the experts' path
per compute capability and dtype (against a transcription of torch 2.13's _grouped_mm_cuda condition),
dtype auto's native-bf16 rule, the MFU peak per GPU model, the deterministic cumulative sum of topp,
Routing.all_ffn's promise, and the graph torch.compile sees on the grouped path. What CUDA would do
is stood in for where CPU torch differs: the host syncs (HostReads, a dispatch mode that counts the
operations whose result the host must wait for), the refusals of use_deterministic_algorithms
(CudaDeterminism), and a grouped_mm whose backward writes the weight gradients of empty groups, as
torch's fused kernel on sm100 was reported to. gpu_check.py runs the rest on a GPU."""
import collections
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import gpu_check  # noqa: E402
import moe  # noqa: E402
from conftest import TINY, config  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CUDA = torch.device('cuda', 0)
# (device name, compute capability) as torch.cuda reports them
GPUS = {'V100': ('Tesla V100-SXM2-16GB', 7, 0), 'T4': ('Tesla T4', 7, 5),
        'A100': ('NVIDIA A100-SXM4-80GB', 8, 0), 'A10': ('NVIDIA A10', 8, 6),
        'L40S': ('NVIDIA L40S', 8, 9), 'H100': ('NVIDIA H100 80GB HBM3', 9, 0),
        'H200': ('NVIDIA H200', 9, 0), 'B200': ('NVIDIA B200', 10, 0),
        'RTX 5090': ('NVIDIA GeForce RTX 5090', 12, 0), 'Thor': ('NVIDIA Thor', 11, 0)}


@pytest.fixture
def gpu(monkeypatch):
    """gpu(key): torch.cuda answers as if that GPU were device 0 (nothing else of torch.cuda is used)"""
    def pretend(key):
        name, major, minor = GPUS[key]
        props = SimpleNamespace(name=name, major=major, minor=minor)
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
        monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device=None: props)
        monkeypatch.setattr(torch.version, 'hip', None)
        # a bf16 tensor can be made on any CUDA GPU (emulated before sm80): what
        # is_bf16_supported(including_emulation=True) tries last
        monkeypatch.setattr(torch.cuda, '_check_bf16_tensor_supported', lambda device: True)
    return pretend


def fused_kernel_runs(major, dtype):
    """torch 2.13 GroupedBlas.cpp, _grouped_mm_cuda: use_fast_path = _scaled_mm_allowed_device(sm90_only=true,
    sm100_only=true) && a, b and out are bf16; _scaled_mm_allowed_device(true, true) = major == 9 || major == 10"""
    return (major == 9 or major == 10) and dtype == torch.bfloat16

# -----------------------------------------------------------------------------
# the experts' path


@pytest.mark.parametrize('key', list(GPUS))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_auto_takes_grouped_mm_only_where_the_fused_kernel_runs(gpu, key, dtype):
    gpu(key)
    grouped, why = moe.expert_path('auto', CUDA, dtype, (512, 128))
    assert grouped == fused_kernel_runs(GPUS[key][1], dtype)
    name, major, minor = GPUS[key]
    assert why.startswith(f"{name.removeprefix('NVIDIA ')} sm{major}{minor}")
    if not grouped and major not in (9, 10):
        assert why.endswith("torch's grouped_mm is a per-group loop there")


def test_the_reasons_read_as_the_log_line_says(gpu):
    gpu('H200')
    assert moe.expert_path('auto', CUDA, torch.bfloat16, (768, 768)) == (True, 'H200 sm90, bf16')
    assert moe.expert_path('auto', CUDA, torch.float32, (768, 768)) == (
        False, "H200 sm90, float32: torch's fused grouped_mm takes bf16 only")
    gpu('A100')
    assert moe.expert_path('auto', CUDA, torch.bfloat16, (768, 768)) == (
        False, "A100-SXM4-80GB sm80: torch's grouped_mm is a per-group loop there")


def test_rows_not_16_byte_aligned_take_the_loop_or_refuse_grouped(gpu):
    gpu('H100')
    # 20 bf16 values = 40 bytes per row: not a multiple of 16
    grouped, why = moe.expert_path('auto', CUDA, torch.bfloat16, (512, 20))
    assert not grouped and 'multiples of 8' in why
    assert moe.expert_path('auto', CUDA, torch.bfloat16, (512, 24))[0]
    with pytest.raises(ValueError, match="expert_impl='grouped' needs n_embd and expert_hidden"):
        moe.expert_path('grouped', CUDA, torch.bfloat16, (512, 20))


def test_cpu_rocm_and_given_impls(gpu, monkeypatch):
    assert moe.expert_path('auto', torch.device('cpu'), torch.bfloat16, (512, 128)) == (
        False, "cpu: torch's grouped_mm is a per-group loop there")
    gpu('H100')
    assert moe.expert_path('grouped', CUDA, torch.float32, (512, 128)) == (True, "expert_impl='grouped'")
    assert moe.expert_path('loop', CUDA, torch.bfloat16, (512, 128)) == (False, "expert_impl='loop'")
    monkeypatch.setattr(torch.version, 'hip', '6.4')
    assert not moe.expert_path('auto', CUDA, torch.bfloat16, (512, 128))[0]


def test_experts_path_uses_the_layer_widths(gpu):
    gpu('H100')
    cfg = GPTConfig(n_embd=64, n_head=4, router='softmax', n_experts=4, top_k=2, expert_hidden=20)
    layer = moe.MoE(cfg, 20)
    assert not layer.experts.path(CUDA, torch.bfloat16)[0]
    assert moe.MoE(GPTConfig(**{**vars(cfg), 'expert_hidden': 32}), 32).experts.path(CUDA, torch.bfloat16)[0]


def test_train_logs_the_experts_path_and_refuses_unaligned_grouped(trainer):
    r = trainer.run([*TINY, config('softmax'), '--max_iters=1'], cache=False).check()
    assert "experts: loop (cpu: torch's grouped_mm is a per-group loop there)" in r.out
    r = trainer.run([*TINY, config('softmax'), '--max_iters=1', '--expert_hidden=10',
                     '--expert_impl=grouped'], cache=False)
    assert r.rc != 0 and r.stderr.strip().splitlines()[-1].startswith(
        "train.py: error: expert_impl='grouped' needs n_embd and expert_hidden to be multiples of 4")
    assert not r.train


def traced(experts, x, counts):
    """(how many _grouped_mm calls dynamo put in the graph, its break reasons)"""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(experts)(x, counts)
    calls = [n for g in ex.graphs for n in g.graph.nodes if 'grouped_mm' in str(n.target)]
    return len(calls), [str(b.reason) for b in ex.break_reasons]


def test_compile_traces_grouped_mm_in_bf16_and_runs_it_eagerly_otherwise():
    """the meta kernel of _grouped_mm takes bf16 only (torch 2.13 _meta_registrations.py): bf16 is traced into
    the graph, float32 runs eagerly (a graph break), and both give the eager result"""
    cfg = GPTConfig(n_embd=16, n_head=4, router='softmax', n_experts=4, top_k=2, expert_hidden=16,
                    expert_impl='grouped', arch='llama')
    torch.manual_seed(0)
    experts = moe.Experts(cfg, 4, 16)
    with torch.no_grad():
        experts.c_fc.normal_(0, 0.3)
        experts.c_proj.normal_(0, 0.3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16)
    assert traced(experts.bfloat16(), x.bfloat16(), counts) == (2, [])
    calls, reasons = traced(experts.float(), x, counts)
    assert calls == 0 and any('torch.compiler.disable' in r for r in reasons)
    compiled = torch.compile(experts, backend='eager')
    torch.testing.assert_close(compiled(x, counts), experts(x, counts), rtol=0, atol=0)
    torch._dynamo.reset()


def test_grouped_weight_grads_of_empty_experts_are_exactly_zero():
    cfg = GPTConfig(n_embd=16, n_head=4, router='softmax', n_experts=4, top_k=2, expert_hidden=16,
                    expert_impl='grouped', arch='gpt2', bias=True)
    experts = moe.Experts(cfg, 4, 16)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    experts(torch.randn(7, 16), torch.tensor([0, 4, 0, 3])).square().sum().backward()
    for p in experts.parameters():
        assert (p.grad[[0, 2]] == 0).all() and (p.grad[[1, 3]] != 0).any()


class EmptyGroupsWritten(torch.autograd.Function):
    """F.grouped_mm (2-D rows, 3-D weights) whose backward gives each group with no rows a weight
    gradient of ones, as torch's fused kernel on sm100 was reported to give them non-zero values"""

    @staticmethod
    def forward(ctx, a, b, offs, grouped_mm):
        ctx.save_for_backward(a, b, offs)
        ctx.grouped_mm = grouped_mm
        return grouped_mm(a, b, offs=offs)

    @staticmethod
    def backward(ctx, g):
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
            g_a, g_b = torch.autograd.grad(ctx.grouped_mm(a, b, offs=offs), (a, b), g.contiguous())
        rows = torch.diff(offs, prepend=offs.new_zeros(1))
        return g_a, g_b + (rows == 0)[:, None, None], None, None


@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_empty_experts_weight_grads_stay_zero_when_the_kernel_writes_them(monkeypatch, arch):
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, 'grouped_mm', lambda a, b, offs=None: EmptyGroupsWritten.apply(
        a, b, offs, grouped_mm))
    # the stand-in does write them
    b = torch.randn(3, 4, 8, requires_grad=True)
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    F.grouped_mm(torch.randn(5, 4), b, offs=offs).sum().backward()
    assert (b.grad[1] == 1).all()
    cfg = GPTConfig(n_embd=16, n_head=4, router='softmax', n_experts=4, top_k=2, expert_hidden=16,
                    expert_impl='grouped', arch=arch, bias=arch == 'gpt2')
    experts = moe.Experts(cfg, 4, 16)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    experts(torch.randn(7, 16), torch.tensor([0, 4, 0, 3]), torch.rand(7)).square().sum().backward()
    for name, p in experts.named_parameters():
        assert (p.grad[[0, 2]] == 0).all() and (p.grad[[1, 3]] != 0).any(), name

# -----------------------------------------------------------------------------
# dtype auto and the MFU peak


@pytest.mark.parametrize('key, dtype', [('V100', 'float32'), ('T4', 'float32'), ('A100', 'bfloat16'),
                                        ('H100', 'bfloat16'), ('RTX 5090', 'bfloat16')])
def test_dtype_auto_takes_native_bf16_only(gpu, key, dtype):
    """torch.cuda.is_bf16_supported() counts emulation (a V100 or T4 would say yes); native = major >= 8"""
    gpu(key)
    name, why = cli.auto_dtype('cuda')
    assert name == dtype and why.startswith(GPUS[key][0])
    assert name == ('bfloat16' if GPUS[key][1] >= 8 else 'float32')


@pytest.mark.parametrize('name, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
    ('NVIDIA H200', 989e12), ('NVIDIA H200 NVL', 835e12), ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA A100-PCIE-40GB', 312e12), ('NVIDIA A100 80GB PCIe', 312e12),
    # not listed: no MFU rather than another model's figure
    ('NVIDIA H800', 0.0), ('NVIDIA GH200 480GB', 0.0), ('NVIDIA H100L', 0.0), ('Tesla V100-SXM2-16GB', 0.0),
    ('NVIDIA L40S', 0.0), ('', 0.0)])
def test_mfu_peak_is_the_exact_model_s(name, peak):
    assert cli.gpu_peak(name) == peak


def test_gpu_preset_has_no_peak_of_its_own():
    scope = {}
    exec((Path(config('gpu'))).read_text(), scope)
    assert 'peak_flops' not in scope

# -----------------------------------------------------------------------------
# topp under torch.use_deterministic_algorithms


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_cumulative_sum_is_cpu_cumsum_exactly(deterministic):
    torch.manual_seed(0)
    for E in (2, 8, 64):
        v = torch.randn(4096, E).softmax(-1).sort(-1, descending=True).values
        assert torch.equal(moe.cumulative(v), v.cumsum(-1))
    # a tie at the threshold: 0.25 + 0.15 is 0.4 in float32, not above it, so the third expert is taken too
    v = torch.tensor([[0.25, 0.15, 0.1, 0.5]])
    assert torch.equal(moe.cumulative(v), v.cumsum(-1))
    assert (moe.cumulative(v) > 0.4).tolist() == [[False, False, True, True]]


def test_topp_routes_the_same_under_deterministic_algorithms():
    cfg = GPTConfig(n_embd=16, n_head=4, router='topp', n_experts=8, top_k=2,
                    router_options=dict(moe.router_settings(), topp_threshold=0.3))
    torch.manual_seed(0)
    router = moe.ROUTERS['topp'](cfg)
    x = torch.randn(512, 16) * 3
    free = router(x)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        fixed = router(x)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(free.ids, fixed.ids) and torch.equal(free.weights, fixed.weights)
    assert (free.ids == moe.UNUSED).any() and (free.ids[:, 1] >= 0).any()

def test_train_topp_deterministic_gives_the_same_losses(trainer):
    """train.py --deterministic=True with topp: torch.use_deterministic_algorithms for the whole run; on CPU it
    trains the same losses as without"""
    args = [*TINY, config('topp'), '--max_iters=4', '--eval_interval=4']
    free = trainer.run(args).check()
    fixed = trainer.run([*args, '--deterministic=True']).check()
    assert sorted(fixed.losses()) == [1, 2, 3, 4] and fixed.losses() == free.losses()


# -----------------------------------------------------------------------------
# Routing.all_ffn: the promise that spares the count's host sync


@pytest.mark.parametrize('name', list(moe.ROUTERS))
@pytest.mark.parametrize('training', [True, False])
def test_a_routing_that_says_all_ffn_has_an_ffn_expert_in_every_slot(name, training):
    E = 4
    cfg = GPTConfig(n_embd=16, n_head=4, router=name, n_experts=E, top_k=1 if name == 'switch' else 2,
                    router_options=moe.router_settings())
    torch.manual_seed(0)
    router = moe.ROUTERS[name](cfg).train(training)
    x = torch.randn(64, 16) * 3
    r = router(x, None)
    if r.all_ffn:
        assert ((r.ids >= 0) & (r.ids < E)).all()


@pytest.mark.parametrize('name', ['softmax', 'topp', 'tcmoe'])
def test_the_known_count_gives_what_reading_the_count_gives(name):
    """a layer with force_balance and Drop-Top-1 too: the slots left still all hold FFN experts"""
    cfg = GPTConfig(n_embd=16, n_head=4, router=name, n_experts=4, top_k=2, expert_hidden=16,
                    router_options=moe.router_settings())
    torch.manual_seed(0)
    layer = moe.MoE(cfg, 16)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(48, 16)
    r = layer.router(x)
    for ids in (r.ids, r.ids[:, 1:], torch.arange(96).view(48, 2) % 4):
        w = r.weights[:, -ids.shape[1]:]
        full = bool(((ids >= 0) & (ids < 4)).all())
        read = layer.routed(x, ids, w, False)
        if full:
            known = layer.routed(x, ids, w, True)
            torch.testing.assert_close(known[0], read[0], rtol=0, atol=0)
            assert torch.equal(known[1], read[1]) and known[2] == read[2] == 0

# -----------------------------------------------------------------------------
# host syncs, counted on CPU: the operations whose result the host must wait for on CUDA

aten = torch.ops.aten
# a value read on the host (item, int, bool), or an output sized by the data
READS = {aten._local_scalar_dense.default: 'value read', aten.nonzero.default: 'nonzero',
         aten.masked_select.default: 'masked_select', aten.bincount.default: 'bincount',
         aten._unique2.default: 'unique', aten.unique_dim.default: 'unique',
         aten.unique_consecutive.default: 'unique', aten.equal.default: 'equal'}


class HostReads(TorchDispatchMode):
    """counts, by kind, the operations that sync a CUDA device with the host: READS, a boolean mask
    (its nonzero), repeat_interleave without output_size, and (counted by host_reads) tolist"""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = READS.get(func)
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            what = 'boolean mask'
        if func is aten.repeat_interleave.Tensor and kwargs.get('output_size') is None:
            what = 'repeat_interleave without output_size'
        if what:
            self.seen[what] += 1
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """host_reads(fn) -> what fn read on the host, {kind: count}; F.one_hot as on CUDA, whose class
    range check is a device assert there (on CPU it reads the min and max)"""
    monkeypatch.setattr(F, 'one_hot', lambda t, n: torch.zeros(
        *t.shape, n, dtype=torch.long, device=t.device).scatter_(-1, t[..., None], 1))

    def count(fn):
        mode, tolist = HostReads(), torch.Tensor.tolist

        def counted(t):
            mode.seen['tolist'] += 1
            return tolist(t)
        monkeypatch.setattr(torch.Tensor, 'tolist', counted)
        try:
            with mode:
                fn()
        finally:
            monkeypatch.setattr(torch.Tensor, 'tolist', tolist)
        return dict(mode.seen)
    return count


def small_layer(router='softmax', impl='grouped', **settings):
    cfg = GPTConfig(n_embd=16, n_head=4, router=router, n_experts=4, expert_hidden=16,
                    top_k=1 if router == 'switch' else 2, expert_impl=impl,
                    router_options=moe.router_settings(), **settings)
    torch.manual_seed(0)
    return moe.MoE(cfg, 16)


def forward_backward(layer):
    x = torch.randn(2, 24, 16, requires_grad=True)
    y, aux = layer(x)
    (y.square().sum() + aux['balance']).backward()


@pytest.mark.parametrize('router, impl, all_ffn', [
    ('softmax', 'grouped', True), ('softmax', 'loop', True), ('deepseek', 'grouped', True),
    ('topp', 'grouped', False), ('topp', 'loop', False), ('remoe', 'grouped', False),
    ('expert_choice', 'grouped', False)])
@pytest.mark.parametrize('capacity', [0.0, 1.0])
def test_host_syncs_of_an_moe_layer_are_the_documented_ones(host_reads, router, impl, all_ffn,
                                                            capacity):
    """a training forward + backward: the loop's rows per expert, the count where a routing is not
    all_ffn, a capacity's boolean mask; nothing else (docs/performance.md; gpu_check.py counts the
    same on a GPU)"""
    seen = host_reads(lambda: forward_backward(small_layer(router, impl, capacity_factor=capacity)))
    want = gpu_check.expected_syncs(impl == 'grouped', all_ffn) + (capacity > 0)
    assert sum(seen.values()) == want, seen


def test_expert_parallel_exchange_travels_in_the_compute_dtype(monkeypatch):
    """under bf16 autocast the rows, their weights and the outputs go in bf16 both ways (the
    exchange a mirror, as below; tests/test_ep.py runs it over gloo)"""
    sent = []

    def mirror(out, x, out_splits=None, in_splits=None, group=None):
        if x.is_floating_point():
            sent.append(x.dtype)
        out.copy_(x)
    monkeypatch.setattr(moe.dist, 'all_to_all_single', mirror)
    layer = small_layer(ep_size=2)
    moe.set_expert_parallel(layer, 'the EP group')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        forward_backward(layer)
    assert sent == [torch.bfloat16] * 6


def test_host_syncs_of_an_expert_parallel_layer(host_reads, monkeypatch):
    """ep_size=2, the exchange a mirror (the other rank sends this one what it sends): one sync, the
    splits of the exchange; the received rows are regrouped without reading their number again"""
    def mirror(out, x, out_splits=None, in_splits=None, group=None):
        out.copy_(x)
    monkeypatch.setattr(moe.dist, 'all_to_all_single', mirror)
    layer = small_layer(ep_size=2)
    moe.set_expert_parallel(layer, 'the EP group')
    assert host_reads(lambda: forward_backward(layer)) == {'tolist': 1}


@pytest.mark.parametrize('router, impl', [('dense', 'auto'), ('softmax', 'grouped'),
                                          ('deepseek', 'grouped')])
def test_a_training_step_on_the_grouped_path_syncs_nowhere(host_reads, router, impl):
    """a GPT's forward, backward, AdamW step and end_step (gpu_check.py's step), after a first step
    (AdamW's state): the number of assignments is known (T*k), the statistics stay on the device"""
    cfg = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, arch='llama',
                    router=router, n_experts=4, top_k=2, expert_hidden=32, expert_impl=impl,
                    router_options=moe.router_settings())
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    idx = torch.randint(0, 64, (2, 33))

    def step():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        moe.end_step(model)
    step()
    assert host_reads(step) == {}


class CudaDeterminism(TorchDispatchMode):
    """under torch.use_deterministic_algorithms(True), what CUDA refuses, refused on CPU too:
    cumsum and cumprod of floating tensors (torch 2.13's list)"""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func.overloadpacket in (aten.cumsum, aten.cumprod)
                and (kwargs.get('dtype') or args[0].dtype).is_floating_point
                and torch.are_deterministic_algorithms_enabled()):
            raise RuntimeError(f'{func} does not have a deterministic implementation on CUDA')
        return func(*args, **kwargs)


@pytest.mark.parametrize('router', list(moe.ROUTERS))
def test_every_router_trains_under_cuda_s_deterministic_refusals(deterministic, router):
    with CudaDeterminism():
        # the stand-in refuses
        with pytest.raises(RuntimeError, match='deterministic'):
            torch.rand(4, 3).cumsum(-1)
        forward_backward(small_layer(router))

# -----------------------------------------------------------------------------
# gpu_check.py's parts that run without a GPU


def test_gpu_check_refuses_without_cuda_in_one_line():
    import subprocess
    p = subprocess.run([sys.executable, str(Path(gpu_check.__file__))], capture_output=True, text=True,
                       env={'CUDA_VISIBLE_DEVICES': '', 'PATH': '/usr/bin:/bin'}, timeout=120)
    assert p.returncode == 1 and p.stdout == ''
    assert p.stderr.strip().splitlines() == [
        "gpu_check.py: error: torch sees no CUDA device: run it on a GPU machine "
        "(the CPU parts are tests/test_gpu_path.py)"]


def test_gpu_check_expert_comparison_passes_on_cpu_and_catches_a_dropped_factor(monkeypatch):
    """its grouped / loop / naive comparison, every mode, on CPU; with the combine weight dropped from the
    loop's proj bias the comparison must fail"""
    rows = gpu_check.compare_paths(torch.device('cpu'), d=64, hidden=32)
    assert len(rows) == 12 and all(r['status'] == 'PASS' for r in rows), gpu_check.table(rows)
    monkeypatch.setattr(moe, 'weigh', lambda t, w: t)
    rows = gpu_check.compare_paths(torch.device('cpu'), d=64, hidden=32)
    assert any(r['status'] == 'FAIL' for r in rows if r['check'].startswith('experts'))


def test_gpu_check_expected_syncs_and_table():
    assert [gpu_check.expected_syncs(g, f) for g in (True, False) for f in (True, False)] == [0, 1, 1, 2]
    text = gpu_check.table([gpu_check.row('a', 'PASS', 1, 'x')])
    assert text.splitlines() == ['| check | status | number | detail |', '|---|---|---|---|', '| a | PASS | 1 | x |']
    # a subprocess's output tail: one cell
    text = gpu_check.table([gpu_check.row('b', 'FAIL', 1, 'Traceback\n  x | y')])
    assert text.splitlines()[2] == '| b | FAIL | 1 | Traceback /   x \\| y |'


def test_gpu_check_stops_a_command_past_its_time(tmp_path):
    import time
    cmd = [sys.executable, '-c', "print('started', flush=True); import time; time.sleep(60)"]
    rc, out, took = gpu_check.run(cmd, tmp_path, 3, time.time() + 100)
    assert rc == 124 and out.startswith('started') and took < 30


def test_gpu_check_reads_sync_warnings_and_finds_get_batch():
    """the warning lines python -W always prints, as train.py's would print them under
    set_sync_debug_mode('warn'); get_batch's lines hold the micro-batches' copies"""
    import subprocess
    warn = "import warnings; warnings.warn('called a synchronizing CUDA operation')"
    p = subprocess.run([sys.executable, '-W', 'always::UserWarning', '-c', warn],
                       capture_output=True, text=True, timeout=60)
    assert gpu_check.sync_sites(p.stdout + p.stderr) == [('<string>', 1)]
    train = Path(gpu_check.REPO, 'train.py').read_text().splitlines()
    lines = gpu_check.function_lines(Path(gpu_check.REPO, 'train.py'), 'get_batch')
    assert train[lines[0] - 1].startswith('def get_batch(')
    assert any('non_blocking=True' in train[n - 1] for n in lines)
