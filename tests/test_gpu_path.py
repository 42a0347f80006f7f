"""What runs where on a GPU, checked on CPU with torch.cuda's device queries mocked: the experts' path
per compute capability and dtype (against a transcription of torch 2.13's _grouped_mm_cuda condition),
dtype auto's native-bf16 rule, the MFU peak per GPU model, the deterministic cumulative sum of topp,
Routing.all_ffn's promise, and the graph torch.compile sees on the grouped path. gpu_check.py runs the
rest on a GPU."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import gpu_check  # noqa: E402
import moe  # noqa: E402
from conftest import TINY, config  # noqa: E402
from model import GPTConfig  # noqa: E402

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
