"""
Tests of moe.py (and the MoE parts of model.py). Every numeric test compares against a reference written
here (a naive per-token, per-slot loop; a hand computation) or against the Hugging Face transformers MoE
blocks with the same weights copied in. fp32 throughout, CPU, a few seconds in all.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: moe.py, model.py
import moe  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5
ROUTERS = list(moe.ROUTERS)


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny tensors run fastest on one thread


def config(arch='llama', router='softmax', E=4, k=2, d=16, hidden=24, **kw):
    return GPTConfig(arch=arch, block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=d, bias=arch == 'gpt2',
                     router=router, n_experts=E, top_k=k, mlp_hidden=hidden, expert_hidden=hidden, **kw)


def make_layer(cfg):
    """an MoE layer with random experts (MoE leaves them uninitialised; GPT initialises them), biases nonzero"""
    layer = moe.MoE(cfg, cfg.expert_hidden)
    d, h = cfg.n_embd, cfg.expert_hidden
    with torch.no_grad():
        for ex in (layer.experts, layer.shared):
            if ex is None:
                continue
            ex.c_fc.normal_(0, d ** -0.5)
            ex.c_proj.normal_(0, ex.c_proj.shape[-1] ** -0.5)
            for b in (ex.b_fc, ex.b_proj):
                if b is not None:
                    b.normal_(0, 0.1)
    return layer


def leaf_copies(module):
    return {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in module.named_parameters()}


def expert_ref(x, arch, c_fc, c_proj, b_fc=None, b_proj=None):
    """one MLP expert written out: gpt2 = GELU (tanh form) with biases, llama = silu(gate) * up, rows [gate; up]"""
    h = x @ c_fc.t() + (0 if b_fc is None else b_fc)
    if arch == 'gpt2':
        a = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    else:
        n = h.shape[-1] // 2
        g, u = h[..., :n], h[..., n:]
        a = g * torch.sigmoid(g) * u
    return a @ c_proj.t() + (0 if b_proj is None else b_proj)


def expert_e(P, prefix, arch, e, x):
    return expert_ref(x, arch, P[prefix + 'c_fc'][e], P[prefix + 'c_proj'][e],
                      P[prefix + 'b_fc'][e] if prefix + 'b_fc' in P else None,
                      P[prefix + 'b_proj'][e] if prefix + 'b_proj' in P else None)


def naive_moe(x, ids, w, P, cfg, seated=None):
    """for each token, for each slot: y += routed_scale * w * expert_e(x); ids >= E (cheap experts) and
    assignments with seated[t][j] False (dropped by capacity) add nothing; + shared_scale * shared(x)"""
    E, arch = cfg.n_experts, cfg.arch
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0 or e >= E or (seated is not None and not seated[t][j]):  # e < 0: an UNUSED slot
                continue
            y = y + cfg.routed_scale * w[t, j] * expert_e(P, 'experts.', arch, e, x[t])
        if cfg.n_shared_experts:
            y = y + cfg.shared_scale * expert_e(P, 'shared.', arch, 0, x[t])
        rows.append(y)
    return torch.stack(rows)


def softmax_routing(x, W, k, renorm=True):
    """Mixtral / Shazeer routing by hand"""
    p = torch.softmax(x @ W.t(), dim=-1)
    w, ids = p.topk(k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True) if renorm else w)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


# -----------------------------------------------------------------------------
# 1. dispatch == naive per-expert loop, forward and every gradient

DISPATCH_CASES = {
    # name: (E, k, B, S, renorm, extra config)
    'random': (4, 2, 2, 12, True, {}),
    'empty_experts': (8, 2, 1, 3, True, {}),      # 3 tokens x 2 slots over 8 experts: >= 2 experts get nothing
    'collapsed_top2': (4, 2, 2, 8, True, {}),     # every first choice -> expert 0, every second -> expert 1
    'collapsed_top1': (4, 1, 2, 8, False, {}),    # one expert (2) gets every assignment; others none
    'scaled_shared': (4, 2, 2, 6, True, dict(n_shared_experts=1, routed_scale=2.5, shared_scale=0.5)),
}


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
@pytest.mark.parametrize('case', list(DISPATCH_CASES))
def test_dispatch_matches_naive_loop(arch, case, impl):
    torch.manual_seed(0)
    E, k, B, S, renorm, extra = DISPATCH_CASES[case]
    cfg = config(arch, 'softmax', E=E, k=k, router_renorm=renorm, expert_impl=impl, **extra)
    layer = make_layer(cfg)
    x = torch.randn(B, S, cfg.n_embd)
    if case.startswith('collapsed'):  # a shared direction in x that the gate reads strongly
        x[..., 0] = 3 + 0.1 * torch.randn(B, S)
        with torch.no_grad():
            W = layer.router.gate.weight
            W.mul_(0.1)
            W[:, 0] = torch.tensor([4.0, 2.0, -4.0, -4.0]) if k == 2 else torch.tensor([-4.0, -4.0, 4.0, -4.0])
    x.requires_grad_(True)
    R = torch.randn(B, S, cfg.n_embd)

    y, _ = layer(x)
    params = dict(layer.named_parameters())
    g = grads_of((y * R).sum(), [x] + list(params.values()))

    P = leaf_copies(layer)
    xr = x.detach().clone().requires_grad_(True)
    ids, w = softmax_routing(xr.view(-1, cfg.n_embd), P['router.gate.weight'], k, renorm)
    counts = torch.bincount(ids.flatten(), minlength=E)
    if case == 'empty_experts':
        assert (counts == 0).sum() >= 2
    if case == 'collapsed_top2':
        assert (ids[:, 0] == 0).all() and (ids[:, 1] == 1).all()
    if case == 'collapsed_top1':
        assert (ids[:, 0] == 2).all() and counts[2] == B * S
    y_ref = naive_moe(xr.view(-1, cfg.n_embd), ids, w, P, cfg).view(B, S, -1)
    g_ref = grads_of((y_ref * R).sum(), [xr] + [P[n] for n in params])

    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    for name, a, b in zip(['x'] + list(params), g, g_ref):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f'grad of {name}: {m}')
    if case in ('empty_experts', 'collapsed_top2', 'collapsed_top1'):  # experts without tokens get zero grads
        unused = (counts == 0).nonzero().flatten()
        assert len(unused) >= 2
        for i, name in enumerate(params):
            if name.startswith('experts.'):
                assert (g[1 + i][unused] == 0).all(), name


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
@pytest.mark.parametrize('router', ROUTERS)
def test_dispatch_every_router_matches_naive_loop(router, impl):
    """the same naive loop on each router's own (ids, weights): cheap experts (ids >= E) cost nothing,
    tcmoe's signed weights subtract, moepp's copy / constant experts are added by hand"""
    torch.manual_seed(1)
    k = 1 if router == 'switch' else 2
    cfg = config('gpt2', router, E=4, k=k, expert_impl=impl)
    layer = make_layer(cfg).eval()  # eval: no switch jitter, deterministic routing
    if router == 'tcmoe':
        layer.router.offset.zero_()  # make negative and null slots as likely as positive ones
    x = torch.randn(2, 10, cfg.n_embd, requires_grad=True)
    R = torch.randn(2, 10, cfg.n_embd)
    y, _ = layer(x)
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    g = grads_of((y * R).sum(), [x] + list(params.values()))

    xr = x.detach().clone().requires_grad_(True)
    P = leaf_copies(layer)
    xf = xr.view(-1, cfg.n_embd)
    # the router itself run on the copied leaves, so gradients reach P through its weights
    router_params = {n[len('router.'):]: v for n, v in P.items() if n.startswith('router.')}
    r = torch.func.functional_call(layer.router, router_params, (xf,))
    ids, w = r.ids, r.weights
    y_ref = naive_moe(xf, ids, w, P, cfg)
    E = cfg.n_experts
    if router == 'tcmoe':
        assert (ids == E).any() and (w < 0).any()  # null slots and negative slots both exercised
    if router == 'moepp':  # zero (E), copy (E+1), constant (E+2) experts, written out
        assert (ids == E + 1).any() and (ids == E + 2).any()
        a = torch.softmax(xf @ P['router.const_gate.weight'].t(), dim=-1)
        for t in range(xf.shape[0]):
            for j in range(k):
                if ids[t, j] == E + 1:
                    y_ref[t] = y_ref[t] + w[t, j] * xf[t]
                elif ids[t, j] == E + 2:
                    y_ref[t] = y_ref[t] + w[t, j] * (a[t, 0] * xf[t] + a[t, 1] * P['router.const'])
    y_ref = y_ref.view_as(y)
    g_ref = grads_of((y_ref * R).sum(), [xr] + [P[n] for n in params])
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    for name, a, b in zip(['x'] + list(params), g, g_ref):
        if b is None:  # not reached by the output in the reference either
            assert a is None or (a == 0).all(), name
            continue
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f'grad of {name}: {m}')


# -----------------------------------------------------------------------------
# 2. Hugging Face transformers MoE blocks with the same weights

def hf_block(cls, cfg):
    cfg._experts_implementation = 'eager'  # the per-expert loop (also silences the standalone-module warning)
    return cls(cfg).eval()


def compare_with_hf(layer, block, x):
    """forward, and the gradients of x, the router weight and the routed experts"""
    R = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, _ = layer(x1)
    y2 = block(x2)
    y2 = y2[0] if isinstance(y2, tuple) else y2
    torch.testing.assert_close(y1, y2, atol=ATOL, rtol=RTOL)
    pairs = [(layer.router.gate.weight, block.gate.weight), (layer.experts.c_fc, block.experts.gate_up_proj),
             (layer.experts.c_proj, block.experts.down_proj)]
    g1 = grads_of((y1 * R).sum(), [x1] + [a for a, _ in pairs])
    g2 = grads_of((y2 * R).sum(), [x2] + [b for _, b in pairs])
    for i, (a, b) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(a.view_as(b), b, atol=ATOL, rtol=RTOL, msg=lambda m: f'grad {i}: {m}')


def copy_routed(layer, block):
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.c_fc)  # [E, 2I, d] = cat(gate, up), as our c_fc
        block.experts.down_proj.copy_(layer.experts.c_proj)   # [E, d, I]


def test_softmax_renorm_equals_hf_mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    torch.manual_seed(0)
    cfg = config('llama', 'softmax', E=4, k=2, router_renorm=True)
    layer = make_layer(cfg)
    block = hf_block(MixtralSparseMoeBlock, MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, hidden_act='silu',
        router_jitter_noise=0.0))
    copy_routed(layer, block)
    compare_with_hf(layer, block, torch.randn(2, 8, 16))


def test_softmax_no_renorm_equals_hf_olmoe():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    torch.manual_seed(0)
    cfg = config('llama', 'softmax', E=4, k=2, router_renorm=False)
    layer = make_layer(cfg)
    block = hf_block(OlmoeSparseMoeBlock, OlmoeConfig(
        hidden_size=16, intermediate_size=24, num_experts=4, num_experts_per_tok=2, hidden_act='silu',
        norm_topk_prob=False))
    copy_routed(layer, block)
    compare_with_hf(layer, block, torch.randn(2, 8, 16))


def deepseek_setup():
    """E=8 experts in 2 groups of 4 (so the top-2 group score differs from a plain group sum), keep 1 group,
    k=2, routed_scale 2.5, one shared expert, nonzero bias"""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    torch.manual_seed(0)
    cfg = config('llama', 'deepseek', E=8, k=2, n_shared_experts=1, routed_scale=2.5,
                 router_options=dict(n_group=2, topk_group=1))
    layer = make_layer(cfg)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.15)
        layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.1, 8)[torch.randperm(8)])
    block = hf_block(DeepseekV3MoE, DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1, hidden_act='silu'))
    copy_routed(layer, block)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(layer.router.expert_bias)
        sh = block.shared_experts
        sh.gate_proj.weight.copy_(layer.shared.c_fc[0, :24])
        sh.up_proj.weight.copy_(layer.shared.c_fc[0, 24:])
        sh.down_proj.weight.copy_(layer.shared.c_proj[0])
    x = torch.randn(4, 8, 16)
    # Group masking: Megatron / torchtitan fill the experts of dropped groups with -inf; Hugging Face 4.x
    # filled them with 0.0. The installed transformers 5.24 (DeepseekV3TopkRouter.forward) fills -inf, as
    # moe.py does. The two fills can only disagree when a 0.0 beats (or ties) a kept expert, i.e. when fewer
    # than k kept experts have s + b > 0. The kept groups hold topk_group * E / n_group = 4 >= k experts and
    # s = sigmoid(l) > 0, so only a negative bias can bring s + b to <= 0: we assert s + b > 0 for every token
    # and expert of this input (the bias is still negative for some experts), so the test holds for both fills.
    s = torch.sigmoid(x.view(-1, 16) @ layer.router.gate.weight.t())
    assert (s + layer.router.expert_bias).min() > 0
    return cfg, layer, block, x, s


def test_deepseek_router_equals_hf_topk_router():
    cfg, layer, block, x, s = deepseek_setup()
    xf = x.view(-1, 16).requires_grad_(True)
    r = layer.router(xf)
    _, w_hf, ids_hf = block.gate(xf)
    # the test must exercise both the bias and the group limit: each changes some token's selection
    plain = s.topk(2, dim=-1).indices.sort(-1).values
    biased = (s + layer.router.expert_bias).topk(2, dim=-1).indices.sort(-1).values
    ours = r.ids.sort(-1).values
    assert (plain != biased).any(dim=-1).any(), 'bias does not change any selection: weak test'
    assert (biased != ours).any(dim=-1).any(), 'group limit does not change any selection: weak test'
    # HF returns top-k unsorted: compare as sets, weights in expert-id order
    o1, o2 = r.ids.argsort(-1), ids_hf.argsort(-1)
    assert torch.equal(r.ids.gather(1, o1), ids_hf.gather(1, o2))
    w1 = r.weights.gather(1, o1) * cfg.routed_scale  # routed_scale is applied by the layer, HF's router applies it
    w2 = w_hf.gather(1, o2)
    torch.testing.assert_close(w1, w2, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(xf.shape[0]), atol=1e-6, rtol=0)
    R = torch.randn_like(w1)
    ga = grads_of((w1 * R).sum(), [layer.router.gate.weight])[0]
    gb = grads_of((w2 * R).sum(), [block.gate.weight])[0]
    torch.testing.assert_close(ga, gb, atol=ATOL, rtol=RTOL)


def test_deepseek_layer_equals_hf_deepseek_v3_moe():
    cfg, layer, block, x, _ = deepseek_setup()
    sh = block.shared_experts
    compare_with_hf(layer, block, x)
    # shared expert gradients: ours is one stacked tensor, HF's three Linears
    R = torch.randn_like(x)
    y1, _ = layer(x)
    y2 = block(x)
    g1 = grads_of((y1 * R).sum(), [layer.shared.c_fc, layer.shared.c_proj])
    g2 = grads_of((y2 * R).sum(), [sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight])
    torch.testing.assert_close(g1[0][0], torch.cat([g2[0], g2[1]]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(g1[1][0], g2[2], atol=ATOL, rtol=RTOL)


# -----------------------------------------------------------------------------
# 3. every router: shapes, renormalisation, gradients, deepseek bias balancing, capacity

RENORMALISED = ('softmax', 'sigmoid', 'cosine', 'perturbed_cosine', 'hyper', 'deepseek')
VARIABLE = ('remoe', 'topp', 'expert_choice')  # a variable number of experts per token (tests/test_routing_methods.py)


@pytest.mark.parametrize('router', ROUTERS)
def test_router_shapes_renorm_and_gradients(router):
    torch.manual_seed(0)
    E, k, B, S, d = 4, (1 if router == 'switch' else 2), 2, 16, 16
    cfg = config('gpt2', router, E=E, k=k, d=d)
    layer = make_layer(cfg).train()
    T = B * S
    x = torch.randn(B, S, d, requires_grad=True)
    r = layer.router(x.detach().view(T, d))
    n_probs = {'moepp': E + 3}.get(router, E)
    n_logits = {'tcmoe': 2 * E + k}.get(router, E)
    K = E if router in VARIABLE else k  # variable-count routers: E slots, the unused ones UNUSED (-1) with weight 0
    assert r.ids.shape == (T, K) and r.weights.shape == (T, K)
    assert ((r.ids == moe.UNUSED) <= (r.weights == 0)).all()
    assert r.probs.shape == (T, n_probs)
    # the z-loss's logits, where the router's source has a z-loss (docs/routers.md says which)
    assert (r.logits is None) == (router in ('switch', 'cosine', 'perturbed_cosine', 'hyper', 'deepseek', 'moepp',
                                             'remoe', 'topp', 'expert_choice'))
    assert r.logits is None or r.logits.shape == (T, n_logits)
    assert r.ids.dtype == torch.long and r.ids.min() >= (-1 if router in VARIABLE else 0)
    assert r.ids.max() < n_probs + (router == 'tcmoe')
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    if router != 'tcmoe':  # tcmoe may pick +e and -e of one expert
        used = torch.where(r.ids < 0, -torch.arange(1, K + 1).repeat(T, 1), r.ids)  # UNUSED slots made distinct
        assert (used.sort(-1).values.diff(dim=-1) != 0).all(), 'an expert chosen twice by one token'
    if router in RENORMALISED:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    if router == 'switch':  # weight = the max probability, no renormalisation
        torch.testing.assert_close(r.weights[:, 0], r.probs.max(-1).values)

    prev = torch.randn(T, E + 3) if router == 'moepp' else None  # a previous MoE layer's logits (gating residual)
    y, aux = layer(x, prev)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert set(aux) == {'balance', 'z', 'router', 'state'}
    assert all(torch.isfinite(torch.as_tensor(aux[n])) for n in ('balance', 'z', 'router'))
    assert (aux['state'] is None) == (router != 'moepp')
    loss = (y * torch.randn_like(y)).sum() + aux['balance'] + aux['z'] + aux['router']
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    trainable = [(n, p) for n, p in layer.router.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f'router.{n}'
    for n, p in layer.experts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'experts.{n}'
    if router == 'hyper':  # the hypernetwork is frozen: no gradient, never updated
        frozen = list(layer.router.hypernet.parameters())
        assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
        assert layer.router.embedding.grad.abs().sum() > 0


def test_router_formulas_by_hand():
    """sigmoid and switch against their formulas written out"""
    torch.manual_seed(0)
    E, k, d, T = 4, 2, 16, 20
    x = torch.randn(T, d)
    # sigmoid: s = sigmoid(Wx), top-k, renorm, balance probs s / sum s
    rt = moe.ROUTERS['sigmoid'](config(router='sigmoid')).eval()
    s = torch.sigmoid(x @ rt.gate.weight.t())
    v, i = s.topk(k, -1)
    r = rt(x)
    assert torch.equal(r.ids, i)
    torch.testing.assert_close(r.weights, v / v.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probs, s / s.sum(-1, keepdim=True))
    # switch (eval, no jitter): weight = max softmax
    rt = moe.ROUTERS['switch'](config(router='switch', k=1)).eval()
    p = torch.softmax(x @ rt.gate.weight.t(), -1)
    r = rt(x)
    assert torch.equal(r.ids[:, 0], p.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], p.max(-1).values)
    # cosine, perturbed_cosine, hyper and every other router: tests/test_routers.py, against their sources


def test_deepseek_bias_balances_load():
    torch.manual_seed(0)
    E, d = 4, 16
    cfg = config('llama', 'deepseek', E=E, k=2, d=d, router_options=dict(bias_update_rate=0.02))
    layer = make_layer(cfg)
    x = torch.randn(4, 16, d)
    x[..., 0] += 2.0
    with torch.no_grad():  # skewed: the gate reads feature 0 into experts 0 and 1
        layer.router.gate.weight.mul_(0.3)
        layer.router.gate.weight[:, 0] = torch.tensor([1.5, 1.0, -1.0, -1.5])

    def load_cv():
        layer.reset_stats()
        layer.eval()
        with torch.no_grad():
            layer(x)
        return layer.stats()['load_cv'], torch.tensor(layer.stats()['load'])

    cv0, load0 = load_cv()
    assert cv0 > 0.5, f'input not skewed enough (load {load0.tolist()})'
    layer.train()
    with torch.no_grad():
        layer(x)
    assert (layer.step_counts == 0).all()  # eval or no_grad forwards do not count toward the bias update
    for _ in range(40):
        layer.train()
        layer(x)  # training mode, grad enabled: step_counts accumulate
        assert layer.step_counts.sum() == x.shape[0] * x.shape[1] * 2, \
            'step_counts did not accumulate in a training forward with grad enabled (so the bias never moves)'
        moe.end_step(layer)
        assert (layer.step_counts == 0).all()
    cv1, load1 = load_cv()
    b = layer.router.expert_bias
    assert b[load0.argmax()] < 0 < b[load0.argmin()], b  # overloaded expert pushed down, idle one pulled up
    assert cv1 < 0.5 * cv0, (cv0, cv1, load0.tolist(), load1.tolist())


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
@pytest.mark.parametrize('cf', [0.5, 1.0, 1.25])
def test_capacity_drops_exactly_the_overflow(arch, cf, impl):
    torch.manual_seed(0)
    E, k, B, S, d = 4, 2, 2, 10, 16
    cfg = config(arch, 'softmax', E=E, k=k, d=d, capacity_factor=cf, expert_impl=impl)
    layer = make_layer(cfg)
    x = torch.randn(B, S, d)
    x[..., 0] += 2.0
    with torch.no_grad():  # skewed, so that experts 0 and 1 overflow
        layer.router.gate.weight[:, 0] = torch.tensor([2.0, 1.5, -1.0, -1.0])
    x.requires_grad_(True)
    R = torch.randn(B, S, d)
    y, _ = layer(x)
    params = dict(layer.named_parameters())
    g = grads_of((y * R).sum(), [x] + list(params.values()))

    P = leaf_copies(layer)
    xr = x.detach().clone().requires_grad_(True)
    T = B * S
    ids, w = softmax_routing(xr.view(T, d), P['router.gate.weight'], k)
    cap = math.ceil(cf * k * T / E)
    seats, seated, n_dropped = [0] * E, [[False] * k for _ in range(T)], 0
    for j in range(k):  # slot-major: every first choice is seated before any second choice (GShard)
        for t in range(T):
            e = int(ids[t, j])
            if seats[e] < cap:
                seats[e] += 1
                seated[t][j] = True
            else:
                n_dropped += 1
    assert n_dropped > 0, 'no overflow: weak test'
    y_ref = naive_moe(xr.view(T, d), ids, w, P, cfg, seated).view(B, S, d)
    g_ref = grads_of((y_ref * R).sum(), [xr] + [P[n] for n in params])
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    for name, a, b in zip(['x'] + list(params), g, g_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f'grad of {name}: {m}')
    assert layer.stats()['dropped'] == pytest.approx(n_dropped / (T * k))
    # tokens whose every assignment was dropped get exactly zero (the residual carries them)
    gone = [t for t in range(T) if not any(seated[t])]
    assert gone or cf > 0.5, 'cf=0.5 should drop every assignment of some token: weak test'
    assert (y.detach().view(T, d)[gone] == 0).all()


def test_eval_capacity_is_separate_from_training():
    """capacity_factor drops in training only; at eval the layer is dropless unless eval_capacity_factor is set"""
    torch.manual_seed(0)
    E, k, B, S, d = 4, 2, 2, 10, 16
    x = torch.randn(B, S, d)
    x[..., 0] += 2.0
    outs = {}
    for ecf in (0.0, 1.0):
        torch.manual_seed(0)
        layer = make_layer(config('llama', 'softmax', E=E, k=k, d=d, capacity_factor=1.0, eval_capacity_factor=ecf))
        with torch.no_grad():  # skewed, so that experts 0 and 1 overflow
            layer.router.gate.weight[:, 0] = torch.tensor([2.0, 1.5, -1.0, -1.0])
        P = leaf_copies(layer)
        ids, w = softmax_routing(x.view(-1, d), P['router.gate.weight'], k)
        outs['train', ecf] = layer.train()(x)[0]
        outs['eval', ecf] = layer.eval()(x)[0]
        ref_cfg = config('llama', 'softmax', E=E, k=k, d=d)
        outs['naive', ecf] = naive_moe(x.view(-1, d), ids, w, P, ref_cfg).view(B, S, d)
    assert not torch.allclose(outs['train', 0.0], outs['naive', 0.0], atol=1e-3)  # training drops
    torch.testing.assert_close(outs['eval', 0.0], outs['naive', 0.0], atol=ATOL, rtol=RTOL)  # eval: dropless
    torch.testing.assert_close(outs['eval', 1.0], outs['train', 1.0], atol=ATOL, rtol=RTOL)  # the same drops


# -----------------------------------------------------------------------------
# 4. aux losses on hand-computed cases

def test_balance_loss_hand_cases():
    torch.manual_seed(0)
    E, T = 4, 8
    probs = torch.softmax(torch.randn(T, E), -1)
    # perfectly balanced assignments (each expert gets T*k/E): sum_e f_e P_e = (1/E) sum_e P_e -> exactly 1
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    torch.testing.assert_close(moe.balance_loss(probs, ids), torch.tensor(1.0), atol=1e-6, rtol=0)
    # collapsed, k=1: every token to expert 0 with p_0 = 0.7 -> E * 1 * 0.7 = 2.8
    pc = torch.tensor([0.7, 0.1, 0.1, 0.1]).repeat(T, 1)
    torch.testing.assert_close(moe.balance_loss(pc, torch.zeros(T, 1, dtype=torch.long)), torch.tensor(2.8))
    # collapsed, k=2: experts 0 and 1 take half each -> 4 * (0.5 * 0.7 + 0.5 * 0.1) = 1.6
    ids2 = torch.tensor([[0, 1]]).repeat(T, 1)
    torch.testing.assert_close(moe.balance_loss(pc, ids2), torch.tensor(1.6))
    # cheap ids (>= n, tcmoe's null slots) are not assignments: f is over the 2 + 3 others = [2/5, 3/5, 0, 0]
    ids3 = torch.full((T, 2), E)
    ids3[:2, 0] = 0
    ids3[:3, 1] = 1
    torch.testing.assert_close(moe.balance_loss(pc, ids3), torch.tensor(4 * (2 / 5 * 0.7 + 3 / 5 * 0.1)))


def test_balance_loss_per_sequence_by_hand():
    torch.manual_seed(0)
    B, S, E, k = 3, 5, 4, 2
    T = B * S
    probs = torch.softmax(torch.randn(T, E), -1)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    per_seq = []
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        f = [sum(int(ids[t, j] == e) for t in rows for j in range(k)) / (S * k) for e in range(E)]
        Pm = [sum(float(probs[t, e]) for t in rows) / S for e in range(E)]
        per_seq.append(E * sum(f[e] * Pm[e] for e in range(E)))
    expected = sum(per_seq) / B
    got = moe.balance_loss(probs, ids, B)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert abs(moe.balance_loss(probs, ids, 1).item() - expected) > 1e-3  # the variant differs here
    # and the layer uses it with balance_scope='sequence', one sequence per batch row
    cfg = config('llama', 'softmax', E=E, k=k, balance_scope='sequence')
    layer = make_layer(cfg)
    x = torch.randn(B, S, cfg.n_embd)
    _, aux = layer(x)
    r = layer.router(x.view(T, -1))
    by_hand = 0.0
    for b in range(B):
        sl = slice(b * S, (b + 1) * S)
        f = torch.stack([(r.ids[sl] == e).sum() for e in range(E)]).float() / (S * k)
        by_hand += E * (f * r.probs[sl].mean(0)).sum().item() / B
    assert aux['balance'].item() == pytest.approx(by_hand, rel=1e-5)


def test_z_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(6, 5) * 3
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 6
    assert moe.z_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    assert moe.z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


# -----------------------------------------------------------------------------
# 5. a tiny GPT with MoE layers overfits one batch, every router, both flavours

@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
@pytest.mark.parametrize('router', ROUTERS)
def test_tiny_gpt_overfits_one_batch(arch, router):
    torch.manual_seed(0)
    cfg = GPTConfig(arch=arch, block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, bias=arch == 'gpt2',
                    router=router, n_experts=4, top_k=1 if router == 'switch' else 2, expert_hidden=64)
    model = GPT(cfg).train()
    assert len(model.moe_layers()) == 2
    idx = torch.randint(0, 64, (4, 17))
    x, t = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    ce = []
    for step in range(60):
        moe.set_progress(model, step / 59)
        logits, loss, aux = model(x, t, with_aux=True)
        ce.append(F.cross_entropy(logits.view(-1, 64), t.reshape(-1)).item())
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        moe.end_step(model)
    assert set(aux) == {'balance', 'z', 'router'}
    assert ce[-1] < 0.3 * ce[0], (ce[0], ce[-1])  # about 0.1 after 60 steps for every router and flavour


# -----------------------------------------------------------------------------
# 6. config errors

def test_config_errors():
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        GPTConfig(router='nope')
    with pytest.raises(ValueError, match=r'top_k=5.*n_experts=4'):
        GPT(config(router='softmax', E=4, k=5))
    with pytest.raises(ValueError, match=r'top_k=0.*n_experts=4'):
        moe.MoE(config(router='softmax', E=4, k=0), 24)
    with pytest.raises(ValueError, match=r'top_k=1'):
        moe.MoE(config(router='switch', k=2), 24)
    with pytest.raises(ValueError, match=r'n_group=3'):
        moe.MoE(config(router='deepseek', E=4, k=2, router_options=dict(n_group=3)), 24)
    with pytest.raises(ValueError, match=r'ep_size=3'):
        moe.MoE(config(router='softmax', E=4, k=2, ep_size=3), 24)


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_bf16_weights_and_autocast_match_fp32(arch, impl):
    """bf16 expert weights (bench.py's layers) and bf16 autocast (train.py's) give the float32 layer's output
    to bf16 precision, on both expert paths"""
    torch.manual_seed(0)
    cfg = config(arch, 'softmax', E=4, k=2, d=16, hidden=32, n_shared_experts=1, expert_impl=impl)
    layer = make_layer(cfg)
    x = torch.randn(2, 12, 16)
    ref = layer(x)[0]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_autocast = layer(x)[0]
    half = make_layer(cfg)
    half.load_state_dict(layer.state_dict())
    half = half.to(torch.bfloat16)
    half.router.float()
    y_half = half(x.bfloat16())[0]
    assert y_half.dtype == torch.bfloat16
    for y in (y_autocast, y_half):
        torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


# -----------------------------------------------------------------------------
# 7. the contracts: GPT.forward's aux, a router without hooks, after_step, moe.analysis

class PlainRouter(moe.Router):
    """softmax top-k and nothing else: no hook overridden"""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gate = torch.nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)

    def forward(self, x, prev=None):
        p = self.gate(x).softmax(-1)
        w, ids = self.select(p)
        return moe.Routing(ids=ids, weights=w, probs=p, logits=None)


class CountingRouter(PlainRouter):
    """records what end_step hands it"""
    seen = []

    @classmethod
    def after_step(cls, routers, step):
        cls.seen.append((list(routers), step.counts.clone(), step.tokens.clone()))


def test_router_without_hooks_trains_end_to_end(monkeypatch):
    """a Router subclass that overrides no hook: the layer's cheap_output is the base no-op, end_step
    hands it nothing; forward, backward, the statistics and end_step work as for any router"""
    monkeypatch.setitem(moe.ROUTERS, 'plain', PlainRouter)
    torch.manual_seed(0)
    model = GPT(config(router='plain', E=4, k=2)).train()
    layer = model.moe_layers()[0]
    x = torch.randn(6, 16)
    ids = torch.zeros(6, 2, dtype=torch.long)
    assert layer.router.cheap_output(x, ids, torch.ones(6, 2)) is None
    idx = torch.randint(0, 64, (2, 9))
    logits, loss, aux = model(idx[:, :-1], idx[:, 1:], with_aux=True)
    assert logits.shape == (2, 8, 64) and set(aux) == {'balance', 'z', 'router'}
    assert aux['z'].item() == 0.0  # logits=None: no z-loss
    loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert layer.step_counts.sum() == 2 * 8 * 2
    moe.end_step(model)
    assert layer.step_counts.sum() == 0 and layer.step_tokens == 0
    assert sum(layer.stats()['load']) == 2 * 8 * 2
    # a dense model's aux is empty, and with_aux=False returns two values as before
    dense = GPT(config(router='dense'))
    assert dense(idx, with_aux=True)[2] == {} and len(dense(idx)) == 2


def test_end_step_hands_after_step_every_layers_counts(monkeypatch):
    """a router that overrides after_step gets the routers of its class, one per layer, with each layer's
    assignments per expert and tokens of the step's training forwards (by hand: expert_load of the ids
    the router chose); a skipped step (update=False) hands nothing, and every layer counts afresh"""
    monkeypatch.setitem(moe.ROUTERS, 'counting', CountingRouter)
    monkeypatch.setattr(CountingRouter, 'seen', [])
    torch.manual_seed(0)
    model = GPT(config(router='counting', E=4, k=2)).train()
    layers = model.moe_layers()
    chosen = [torch.zeros(4) for _ in layers]
    for m, c in zip(layers, chosen):
        def counted(x, prev, fwd=m.router.forward, c=c):
            r = fwd(x, prev)
            if torch.is_grad_enabled():
                c += moe.expert_load(r.ids, 4)
            return r
        m.router.forward = counted
    for _ in range(2):  # two micro-batches of 2 x 8 tokens
        model(torch.randint(0, 64, (2, 8)))
    with torch.no_grad():  # not a training forward: not counted
        model(torch.randint(0, 64, (2, 8)))
    moe.end_step(model)
    (routers, counts, tokens), = CountingRouter.seen
    assert routers == [m.router for m in layers]
    assert tokens.tolist() == [32.0, 32.0]
    assert counts.tolist() == torch.stack(chosen).tolist() and counts.sum() == 2 * 2 * 32
    model(torch.randint(0, 64, (2, 8)))
    moe.end_step(model, update=False)
    assert len(CountingRouter.seen) == 1
    assert all(m.step_counts.sum() == 0 and m.step_tokens == 0 for m in layers)


def test_analysis_records_and_drop_top1_inside_only():
    """moe.analysis: records has one list per MoE layer with one (ids, weights) (T, K) pair per forward;
    drop_top1 changes the output inside (to the naive sum over each token's remaining slots, scaled to the
    total) and not after; on exit the layers record nothing and route as before"""
    torch.manual_seed(0)
    model = GPT(config(router='softmax', E=4, k=2)).eval()
    idx = torch.randint(0, 64, (2, 8))
    ref = model(idx)[0]
    with moe.analysis(model, record=True) as records:
        inside = model(idx)[0]
        model(idx[:, :5])
    assert len(records) == len(model.moe_layers()) == 2
    for kept in records:
        assert [tuple(i.shape) for i, _ in kept] == [(16, 2), (10, 2)]
        assert all(w.shape == i.shape and i.device.type == 'cpu' for i, w in kept)
    torch.testing.assert_close(inside, ref)
    model(idx)
    assert [len(kept) for kept in records] == [2, 2]  # nothing recorded after exit
    with moe.analysis(model, drop_top1=True):
        dropped = model(idx)[0]
    assert not torch.allclose(dropped, ref, atol=1e-4)
    torch.testing.assert_close(model(idx)[0], ref)  # restored
    # the layer's output inside drop_top1, against the naive loop over the remaining slot
    cfg = config(router='softmax', E=4, k=2)
    layer = make_layer(cfg).eval()
    x = torch.randn(1, 6, 16)
    P = {n: p.detach() for n, p in layer.named_parameters()}
    ids, w = softmax_routing(x.view(-1, 16), P['router.gate.weight'], 2)
    with moe.analysis(layer, drop_top1=True):
        y = layer(x)[0]
    want = naive_moe(x.view(-1, 16), ids[:, 1:], w.sum(-1, keepdim=True), P, cfg)
    torch.testing.assert_close(y.view(-1, 16), want, atol=ATOL, rtol=RTOL)
    top1 = GPT(config(router='softmax', E=4, k=1)).eval()
    with pytest.raises(ValueError, match='top_k >= 2'), moe.analysis(top1, drop_top1=True):
        top1(idx)
    top1(idx)  # restored after an error too: drop_top1 is off again, so no error
