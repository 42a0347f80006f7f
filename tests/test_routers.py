"""
Router fidelity: every router (and variant) against a plain transcription of its source's formula, written here
from the source file named in each reference (not from moe.py): the ids, the combine weights, the balance-loss
probabilities, the z-loss logits, and the gradient of the router's own parameters through the combine weights
alone. Then hand-computed cases: tcmoe's normalisation and signed combine, MoE++'s gating residual and
heterogeneous balance loss, Drop-Top-1 and the margin on signed weights, HyperRouter's k schedule, the z-loss per
router, the routers' own losses (zero in eval, averaged over the MoE layers, absent from train.py's evaluation),
deepseek's balance and bias counts, MoE++'s constant vector. fp32, CPU, tiny sizes; two short train.py runs.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: moe.py, model.py
import moe  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

E, K, D, T = 4, 2, 16, 24


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny tensors run fastest on one thread


def config(router, E=E, k=K, d=D, **options):
    return GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=d, bias=False,
                     router=router, n_experts=E, top_k=k, mlp_hidden=24, router_options=options)


# -----------------------------------------------------------------------------
# transcriptions of the sources: P holds leaf copies of the router's parameters (and buffers), by name

def ref_softmax(P, x, E, k, prev):
    """LibMoE smoe.py (SMoE-R) with moe.py's topk_expert: softmax, top-k, renormalise; z-loss on the logits"""
    gate_logits = x @ P['gate.weight'].t()
    gate_softmax = F.softmax(gate_logits, dim=-1, dtype=torch.float)
    weights, selected = torch.topk(gate_softmax, k)
    weights = weights / torch.sum(weights, dim=-1, keepdim=True)
    return selected, weights, gate_softmax, gate_logits


def ref_switch(P, x, E, k, prev):
    """Switch Transformer (Fedus et al. 2021, router without jitter at eval): expert = argmax p, weight = max p"""
    p = F.softmax(x @ P['gate.weight'].t(), dim=-1)
    gate, index = p.max(dim=-1)
    return index[:, None], gate[:, None], p, None


def ref_sigmoid(P, x, E, k, prev):
    """LibMoE HEAD smoe_sigmoidgating.py / sigma-MoE LM: s = sigmoid(l), top-k, 'norm gate to sum 1';
    balance probabilities s / sum(s) (moe_layer.py, standard mode); z-loss on l"""
    l = x @ P['gate.weight'].t()
    s = torch.sigmoid(l)
    v, i = s.topk(k, dim=-1)
    return i, v / v.sum(-1, keepdim=True), s / s.sum(-1, keepdim=True), l


def ref_xmoe(P, x, E, k, prev, perturbed=False, theta=0.1):
    """LibMoE HEAD xmoe.py: reduced_inp = inp_reduction(x); expert_embeddings *= 1.5 / norm (no_grad, in place);
    gate_logits = normalize(reduced_inp, eps=1e-4) @ M^T; softmax(gate_logits / 0.3); topk; softmax over the k.
    perturbed: the score of moe_perturbed.py, <r, M> / ((|r| + theta)(|M| + theta)), in its place"""
    reduced = x @ P['gate.weight'].t()
    M = P['expert_emb']
    with torch.no_grad():
        M.mul_(1.5 / M.norm(p=2.0, dim=-1, keepdim=True))
    if perturbed:
        gate_logits = (reduced @ M.t()) / ((reduced.norm(dim=-1, keepdim=True) + theta)
                                           * (M.norm(dim=1, keepdim=True).t() + theta))
    else:
        gate_logits = torch.matmul(F.normalize(reduced, p=2.0, dim=-1, eps=1e-4), M.t())
    gate_softmax = F.softmax(gate_logits / 0.3, dim=-1, dtype=torch.float)
    weights, selected = torch.topk(gate_softmax, k=k, dim=-1)
    return selected, torch.softmax(weights, dim=-1), gate_softmax, None


def ref_cosine_libmoe(P, x, E, k, prev, theta=None):
    """LibMoE v1.1 moe_cosinegating.py (theta None) / moe_perturbed.py: gate = Linear(d, E, bias=True);
    gate_logits = (x @ W^T) / (||x|| ||W||^T) (each norm + theta when perturbed); softmax; _keepTopk(p, bias):
    topk(p + bias), softmax over the k"""
    W, b = P['gate.weight'], P['gate.bias']
    if theta is None:
        gate_logits = (x @ W.T) / (torch.norm(x, dim=-1, keepdim=True) * torch.norm(W, dim=1, keepdim=True).T)
    else:
        gate_logits = (x @ W.T) / ((torch.norm(x, dim=-1, keepdim=True) + theta)
                                   * (torch.norm(W, dim=1, keepdim=True).T + theta))
    gate_softmax = F.softmax(gate_logits, dim=-1, dtype=torch.float)
    weights, selected = torch.topk(gate_softmax + b, k=k, dim=-1)
    return selected, torch.softmax(weights, dim=-1), gate_softmax, None


def ref_hyper(P, x, E, k, prev):
    """LibMoE v1.1 hyperrouter.py / HyperRouter custom_gate.py HyperRouterGate: hypernet outputs reshaped to
    (E, d + 1): weight [:, :-1], bias [:, -1]; l = gate(x); topk(l); softmax over the k; no aux loss"""
    h = P['hypernet.0.weight']
    out = (torch.relu(P['embedding'][None] @ h.t() + P['hypernet.0.bias']) @ P['hypernet.2.weight'].t()
           + P['hypernet.2.bias'])
    weights_splice = out[0].reshape([E, -1])
    gate_logits = x @ weights_splice[:, :-1].t() + weights_splice[:, -1]
    weights, selected = torch.topk(gate_logits, k=k, dim=-1)
    return selected, F.softmax(weights, dim=-1), F.softmax(gate_logits, dim=-1), None


def ref_deepseek(P, x, E, k, prev, n_group=2, topk_group=1):
    """DeepSeek-V3 inference/model.py Gate (sigmoid score function, bias, group-limited): scores = sigmoid(l);
    original_scores = scores; scores += bias; group_scores = top-2 sum per group; keep topk_groups; topk; weights =
    original_scores.gather(indices); weights /= weights.sum() (route_scale is the layer's routed_scale); no z-loss"""
    scores = torch.sigmoid(x @ P['gate.weight'].t())
    original_scores = scores
    scores = scores + P['expert_bias']
    scores = scores.view(x.size(0), n_group, -1)
    group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
    indices = group_scores.topk(topk_group, dim=-1)[1]
    mask = scores.new_ones(x.size(0), n_group, dtype=bool).scatter_(1, indices, False)
    scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, k, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return indices, weights, original_scores / original_scores.sum(-1, keepdim=True), None


def ref_tcmoe(P, x, E, k, prev):
    """TC-MoE modeling_tcmoe.py TCMoEBlock / LibMoE moe_tcmoe.py: logits - 1 on negative, - 10 on null slots;
    softmax; topk; weightsum = selected non-null + ALL null; gates / weightsum re-gathered; sign +1 / -1 / 0;
    balance over non-null: p_norm = p[:2E] / sum, P_base = p_norm[pos] + p_norm[neg]; z-loss on the raw gate logits"""
    gate_logits = x @ P['gate.weight'].t()
    logits = gate_logits.clone()
    logits[:, E * 2:] = logits[:, E * 2:] - 10.0
    logits[:, E:E * 2] = logits[:, E:E * 2] - 1.0
    gates = torch.nn.functional.softmax(logits, dim=1)
    weights, selected_experts = torch.topk(gates, k=k, dim=-1)
    weightsum_from_non_null_experts = (weights * (selected_experts < 2 * E).float()).sum(1, keepdim=True)
    weightsum_from_null_experts = gates[:, 2 * E:].sum(1, keepdim=True)
    gates_n = gates / (weightsum_from_non_null_experts + weightsum_from_null_experts)
    weights = torch.gather(gates_n, 1, selected_experts)
    sign = torch.ones_like(weights)
    sign[(selected_experts >= E) & (selected_experts < 2 * E)] = -1.0
    sign[selected_experts >= 2 * E] = 0.0
    ids = torch.where(selected_experts < 2 * E, selected_experts % E, E)
    p_norm = gates[:, :2 * E] / gates[:, :2 * E].sum(-1, keepdim=True)
    return ids, weights * sign, p_norm[:, :E] + p_norm[:, E:], gate_logits


def ref_moepp(P, x, E, k, prev):
    """MoE++ moe_plus_plus_layer.py Router.forward: logits = wg(x); logits += gate_map(gate_residual); then
    LibMoE moe_plus_plus.py's selection: softmax over E + 3, topk, renormalise; the logits go to the next layer"""
    logits = x @ P['gate.weight'].t()
    if prev is not None and 'residual.weight' in P:
        logits = logits + prev @ P['residual.weight'].t()
    gates = F.softmax(logits, dim=1)
    w, i = torch.topk(gates, k=k, dim=1)
    return i, w / w.sum(1, keepdim=True), gates, None


CASES = {  # name: (router, options, reference)
    'softmax': ('softmax', {}, ref_softmax),
    'switch': ('switch', {}, ref_switch),
    'sigmoid': ('sigmoid', {}, ref_sigmoid),
    'cosine-xmoe': ('cosine', dict(cosine_variant='xmoe'), ref_xmoe),
    'cosine-libmoe': ('cosine', dict(cosine_variant='libmoe'), ref_cosine_libmoe),
    'perturbed-xmoe': ('perturbed_cosine', dict(cosine_variant='xmoe'), lambda *a: ref_xmoe(*a, perturbed=True)),
    'perturbed-libmoe': ('perturbed_cosine', dict(cosine_variant='libmoe'),
                         lambda *a: ref_cosine_libmoe(*a, theta=0.1)),
    'hyper': ('hyper', {}, ref_hyper),
    'deepseek': ('deepseek', dict(n_group=2, topk_group=1), ref_deepseek),
    'tcmoe': ('tcmoe', {}, ref_tcmoe),
    'moepp': ('moepp', {}, ref_moepp),
    'moepp-no-residual': ('moepp', dict(moepp_gate_residual=False), ref_moepp),
}


@pytest.mark.parametrize('case', list(CASES))
def test_router_equals_transcription_of_its_source(case):
    name, options, ref = CASES[case]
    torch.manual_seed(0)
    k = 1 if name == 'switch' else K
    router = moe.ROUTERS[name](config(name, k=k, **options)).eval()  # eval: no jitter, no k schedule
    with torch.no_grad():  # weights large enough that the routings are far from uniform
        for n, p in router.named_parameters():
            p.normal_(0, 0.5)
        for n, b in router.named_buffers():
            if n == 'expert_bias':
                b.copy_(torch.linspace(-0.1, 0.1, E)[torch.randperm(E)])
    if case == 'cosine-libmoe' or case == 'perturbed-libmoe':  # the bias must change some selection
        with torch.no_grad():
            router.gate.bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.05]))
    x = torch.randn(T, D)
    n_out = E + 3 if name == 'moepp' else (2 * E + k if name == 'tcmoe' else E)
    prev = torch.randn(T, E + 3, requires_grad=True) if name == 'moepp' else None  # the previous MoE layer's logits
    unheld = None
    if options.get('cosine_variant') == 'xmoe':
        # M off its norm 1.5: the forward's values still the source's (checked below); training holds M at
        # 1.5 after each step (after_step), where the gradients are the source's too
        unheld = router(x, prev).weights.detach()
        type(router).after_step([router], None)
    P = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in router.named_parameters()}
    P.update({n: b.clone() for n, b in router.named_buffers()})
    r = router(x, prev)
    ids, w, probs, logits = ref(P, x, E, k, prev)
    if unheld is not None:
        torch.testing.assert_close(unheld, w, atol=1e-6, rtol=1e-5)
    assert torch.equal(r.ids, ids), case
    torch.testing.assert_close(r.weights, w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.probs, probs, atol=1e-6, rtol=1e-5)
    if logits is None:
        assert r.logits is None, f'{case}: its source has no z-loss'
    else:
        torch.testing.assert_close(r.logits, logits, atol=1e-6, rtol=1e-5)
        assert r.logits.shape == (T, n_out)
    if name == 'moepp':
        expected = x @ P['gate.weight'].t() + (prev @ P['residual.weight'].t() if 'residual.weight' in P else 0)
        torch.testing.assert_close(r.state, expected)  # handed to the next MoE layer
    # gradient of the router's own trainable parameters through the combine weights alone
    R = torch.randn(T, k)
    params = [n for n, p in router.named_parameters() if p.requires_grad]
    assert params, case
    g = torch.autograd.grad((r.weights * R).sum(), [dict(router.named_parameters())[n] for n in params],
                            allow_unused=True, retain_graph=True)
    g_ref = torch.autograd.grad((w * R).sum(), [P[n] for n in params], allow_unused=True, retain_graph=True)
    for n, a, b in zip(params, g, g_ref):
        if b is None:  # the reference's weights do not reach this parameter (moepp's constant expert)
            assert a is None or (a == 0).all(), f'{case}: {n}'
            continue
        assert a is not None, f'{case}: {n} gets no gradient'
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f'{case}: grad of {n}: {m}')
    if case == 'moepp':  # the residual is not detached: the previous layer's logits get a gradient
        ga = torch.autograd.grad((r.weights * R).sum(), prev)[0]
        gb = torch.autograd.grad((w * R).sum(), prev)[0]
        assert ga.abs().sum() > 0
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
    if case in ('cosine-libmoe', 'perturbed-libmoe'):  # the bias changed the selection of some token
        plain = r.probs.topk(k, dim=-1).indices
        assert (plain != r.ids).any(), 'weak test: the gate bias changes no selection'
        assert router.gate.bias.requires_grad and g[params.index('gate.bias')].abs().sum() > 0
    if name == 'cosine' and options['cosine_variant'] == 'xmoe':
        # held at norm 1.5 after each optimizer step, as the source's forward sets it
        with torch.no_grad():
            router.expert_emb.mul_(2.0)
        type(router).after_step([router], None)
        torch.testing.assert_close(router.expert_emb.norm(dim=-1), torch.full((E,), 1.5))


def test_cosine_variants_have_their_shapes():
    xm = moe.ROUTERS['cosine'](config('cosine', E=8, cosine_variant='xmoe'))
    lm = moe.ROUTERS['cosine'](config('cosine', E=8, cosine_variant='libmoe'))
    assert xm.gate.weight.shape == (4, D) and xm.expert_emb.shape == (8, 4) and xm.gate.bias is None  # E/2 dims
    assert lm.gate.weight.shape == (8, D) and lm.gate.bias.shape == (8,) and not hasattr(lm, 'expert_emb')
    with pytest.raises(ValueError, match="cosine_variant='x'"):
        moe.ROUTERS['cosine'](config('cosine', cosine_variant='x'))

# -----------------------------------------------------------------------------
# tcmoe by hand

def test_tcmoe_normalisation_and_signed_combine_by_hand():
    """E = 2, k = 2: slots +0 +1 -0 -1 null null; the gate reads x's first 6 features as the logits"""
    torch.manual_seed(0)
    E, k = 2, 2
    cfg = config('tcmoe', E=E, k=k, d=8)
    layer = moe.MoE(cfg, 24)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(6, 8))  # x[:, :6] are the logits
        layer.experts.c_fc.normal_(0, 0.4)
        layer.experts.c_proj.normal_(0, 0.2)
    rows = [[2.0, 0.0, 0.5, 2.6, 0.0, 0.0],   # +0 (e^2) and -1 (e^1.6): expert 0 added, expert 1 subtracted
            [0.0, 0.0, 0.0, 0.0, 12.5, 0.0]]   # null slot 4 (e^2.5) first, then +0 / +1 (tie at e^0)
    x = F.pad(torch.tensor(rows), (0, 2))  # d = 8
    r = layer.router(x)
    for t, row in enumerate(rows):
        off = [0, 0, -1, -1, -10, -10]
        e = [math.exp(v + o) for v, o in zip(row, off)]
        p = [v / sum(e) for v in e]
        top = sorted(range(6), key=lambda i: -p[i])[:2]
        Z = sum(p[i] for i in top if i < 4) + p[4] + p[5]
        w = [p[i] / Z * (1 if i < 2 else -1 if i < 4 else 0) for i in top]
        ids = [i % 2 if i < 4 else E for i in top]
        assert r.ids[t].tolist() == ids
        torch.testing.assert_close(r.weights[t], torch.tensor(w), atol=1e-7, rtol=1e-6)
    assert r.ids[0].tolist() == [0, 1] and r.weights[0, 0] > 0 > r.weights[0, 1]
    assert r.ids[1, 0] == E and r.weights[1, 0] == 0  # the null slot: no output, weight 0
    # the signed combine: y = w_0 * expert_0(x) + w_1 * expert_1(x), the negative one subtracted
    y, _ = layer.eval()(x.view(1, 2, 8))

    def expert(e, v):
        h = v @ layer.experts.c_fc[e].t()
        g, u = h[:24], h[24:]
        return (F.silu(g) * u) @ layer.experts.c_proj[e].t()
    for t in range(2):
        by_hand = sum(r.weights[t, j].item() * expert(int(r.ids[t, j]), x[t]) for j in range(k) if r.ids[t, j] < E)
        torch.testing.assert_close(y[0, t], by_hand, atol=1e-6, rtol=1e-5)


def test_tcmoe_balance_counts_non_null_only_and_z_on_raw_logits():
    torch.manual_seed(0)
    E, k, B, S = 2, 2, 1, 6
    layer = moe.MoE(config('tcmoe', E=E, k=k, d=8), 24)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(6, 8))  # x[:, :6] are the logits
    x = F.pad(torch.randn(B * S, 6), (0, 2))  # d = 8; the first 6 features are the logits
    x[:3, 4] = 14.0  # the first three tokens put a null slot first
    r = layer.router(x)
    assert (r.ids == E).sum() >= 3
    _, aux = layer.eval()(x.view(B, S, 8))
    ids = r.ids.tolist()
    non_null = [e for row in ids for e in row if e < E]
    f = [non_null.count(e) / len(non_null) for e in range(E)]  # LibMoE: over the non-null assignments
    p = torch.softmax(x[:, :6] + torch.tensor([0, 0, -1, -1, -10, -10.0]), -1)
    pn = p[:, :4] / p[:, :4].sum(-1, keepdim=True)
    P = [(pn[:, e] + pn[:, E + e]).mean().item() for e in range(E)]
    assert aux['balance'].item() == pytest.approx(E * sum(fe * pe for fe, pe in zip(f, P)), rel=1e-5)
    # raw logits, no offsets
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in x[:, :6].tolist()) / (B * S)
    assert aux['z'].item() == pytest.approx(z, rel=1e-5)
    assert aux['router'] == 0.0  # the null reward is a training loss (LibMoE: only when training)
    _, aux = layer.train()(x.view(B, S, 8))
    assert aux['router'].item() == pytest.approx(-1e-5 * p[:, 4:].sum().item() / (B * S), rel=1e-5)

# -----------------------------------------------------------------------------
# MoE++ by hand: the gating residual through GPT.forward, the heterogeneous balance loss

def test_moepp_gating_residual_through_the_model():
    torch.manual_seed(0)
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=3, n_head=4, n_embd=16, bias=False,
                    router='moepp', n_experts=4, top_k=2, moe_first_dense=1, mlp_hidden=24)
    model = GPT(cfg).eval()
    layers = model.moe_layers()
    assert len(layers) == 2
    seen = []
    for m in layers:  # record what each router is given and returns
        fwd = m.router.forward
        m.router.forward = lambda x, prev, fwd=fwd: seen.append((x, prev, fwd(x, prev))) or seen[-1][2]
    idx = torch.randint(0, 64, (2, 8))
    model(idx)
    (x1, prev1, r1), (x2, prev2, r2) = seen
    assert prev1 is None  # the first MoE layer has no previous logits (the dense layer 0 passes nothing)
    R1, R2 = layers[0].router, layers[1].router
    torch.testing.assert_close(r1.state, x1 @ R1.gate.weight.t())
    assert prev2 is r1.state  # the second gets the first's logits (their gradient: the test above)
    torch.testing.assert_close(r2.state, x2 @ R2.gate.weight.t() + r1.state @ R2.residual.weight.t())
    # the residual's weight is trained: it gets a gradient from the language-model loss
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert R2.residual.weight.grad.abs().sum() > 0 and R1.gate.weight.grad.abs().sum() > 0
    off = GPTConfig(**{**cfg.__dict__, 'router_options': dict(moepp_gate_residual=False)})
    assert GPT(off).moe_layers()[1].router.residual is None


def test_moepp_heterogeneous_balance_loss_by_hand():
    torch.manual_seed(0)
    E, k, B, S = 4, 2, 1, 10
    n = E + 3
    for tau in (0.75, 1.0):
        layer = moe.MoE(config('moepp', E=E, k=k, moepp_tau=tau), 24)
        with torch.no_grad():
            layer.router.gate.weight.normal_(0, 1.0)
        x = torch.randn(B, S, D)
        _, aux = layer(x)
        r = layer.router(x.view(-1, D))
        assert (r.ids >= E).any(), 'no cheap expert chosen: weak test'
        eta = [1.0] * E + [tau] * 3
        f = [(r.ids == e).sum().item() / (S * k) for e in range(n)]
        P = r.probs.mean(0).tolist()
        expected = n * sum(eta[e] * f[e] * P[e] for e in range(n))
        assert aux['balance'].item() == pytest.approx(expected, rel=1e-5)
        assert aux['z'].item() == 0.0  # MoE++: no z-loss
    # moe.balance_loss with the factors, on a hand case: 2 tokens, k = 1, n = 3 experts, eta = [1, 1, 0.5]
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.2, 0.7]])
    ids = torch.tensor([[0], [2]])
    got = moe.balance_loss(probs, ids, weight=torch.tensor([1.0, 1.0, 0.5]))
    assert got.item() == pytest.approx(3 * (1 * 0.5 * 0.3 + 0.5 * 0.5 * 0.5), rel=1e-6)

# -----------------------------------------------------------------------------
# Drop-Top-1 and the routing metrics on signed weights

def test_drop_top1_on_signed_weights_by_hand():
    ids = torch.tensor([[0, 1], [2, 3], [1, 4], [3, 0]])
    w = torch.tensor([[0.6, -0.3], [0.5, 0.2], [0.7, 0.0], [-0.8, 0.5]])  # row 2: a null slot (id 4 = E, weight 0)
    i, v = moe.drop_top1(ids, w)
    assert i.tolist() == [[1], [3], [4], [0]]
    # the subtracted expert stays subtracted with the total |w| (0.9); weights >= 0 keep their total (0.7);
    # a token left with only a null slot gets nothing (no 0/0); signs are kept
    torch.testing.assert_close(v, torch.tensor([[-0.9], [0.7], [0.0], [1.3]]))
    assert torch.isfinite(v).all()
    # in the layer: tcmoe with drop_top1 gives the naive signed sum over the remaining slots
    torch.manual_seed(0)
    layer = moe.MoE(config('tcmoe', E=2, k=2, d=8), 24).eval()
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(6, 8))  # x[:, :6] are the logits
        layer.experts.c_fc.normal_(0, 0.4)
        layer.experts.c_proj.normal_(0, 0.2)
    x = torch.tensor([[2.0, 0.0, 0.5, 2.6, 0.0, 0.0, 0.0, 0.0]])  # +0 then -1 (see the hand case above)
    r = layer.router(x)
    assert r.ids.tolist() == [[0, 1]] and r.weights[0, 1] < 0
    with moe.analysis(layer, drop_top1=True):
        y, _ = layer(x.view(1, 1, 8))
    h = x[0] @ layer.experts.c_fc[1].t()
    e1 = (F.silu(h[:24]) * h[24:]) @ layer.experts.c_proj[1].t()
    total = r.weights.abs().sum()
    torch.testing.assert_close(y[0, 0], -total * e1, atol=1e-6, rtol=1e-5)  # expert 1, still subtracted


def test_weight_sums_on_signed_weights_by_hand():
    w = torch.tensor([[0.6, -0.3], [0.5, 0.5], [0.0, -0.4]])
    entropy, margin, negative = moe.weight_sums(w)
    h = lambda *q: -sum(v * math.log(v) for v in q if v > 0)
    assert entropy.item() == pytest.approx(h(2 / 3, 1 / 3) + h(0.5, 0.5) + h(1.0), rel=1e-6)
    assert margin.item() == pytest.approx(0.3 + 0.0 + 0.4, rel=1e-6)  # |w|_(1) - |w|_(2) per token
    assert negative.item() == 2
    layer = moe.MoE(config('tcmoe'), 24)
    with torch.no_grad():
        layer.router.offset.zero_()  # negative slots as likely as positive ones
    layer.eval()(torch.randn(2, 8, D))
    r_neg = layer.stats()['negative']
    assert 0 < r_neg < 1

# -----------------------------------------------------------------------------
# hyper's k schedule (HyperRouter new_utils.calculate_gate_number 'linear_increase', LibMoE set_num_current_selected)

def source_k(step, total, k_min, k_max):
    """round(number_experts * steps / overall_steps) + min_experts, Python's round"""
    return round((k_max - k_min) * step / total) + k_min


@pytest.mark.parametrize('k_min', [1, 2])
def test_hyper_k_schedule_is_the_sources(k_min):
    torch.manual_seed(0)
    k = 4 if k_min == 2 else 2
    rt = moe.ROUTERS['hyper'](config('hyper', E=4, k=k, hyper_k_min=k_min)).train()
    x = torch.randn(T, D)
    for step in range(0, 101, 5):
        rt.progress = step / 100
        assert rt(x).ids.shape[1] == source_k(step, 100, k_min, k), step
    if k_min == 1:  # LibMoE's defaults: k = 1 through half of training (round(0.5) = 0) ...
        rt.progress = 0.5
        r = rt(x)
        assert r.ids.shape[1] == 1 and (r.weights == 1).all()
        # ... and a softmax over one value is constant: no gradient reaches the router through the weights
        g = torch.autograd.grad(r.weights.sum(), rt.embedding, allow_unused=True)[0]
        assert g is None or (g == 0).all()
    else:  # hyper_k_min >= 2: the router gets a gradient from the first step
        rt.progress = 0.0
        r = rt(x)
        assert r.ids.shape[1] == 2
        assert torch.autograd.grad((r.weights * torch.randn_like(r.weights)).sum(), rt.embedding)[0].abs().sum() > 0
    rt.eval()
    assert rt(x).ids.shape[1] == k  # evaluation uses top_k
    with pytest.raises(ValueError, match='hyper_k_min=3'):
        moe.ROUTERS['hyper'](config('hyper', k=2, hyper_k_min=3))

# -----------------------------------------------------------------------------
# z-loss per router

@pytest.mark.parametrize('router', list(moe.ROUTERS))
def test_z_loss_where_the_source_has_one(router):
    torch.manual_seed(0)
    k = 1 if router == 'switch' else K
    layer = moe.MoE(config(router, k=k), 24).eval()
    x = torch.randn(2, 6, D)
    _, aux = layer(x)
    # switch (Switch Transformer), cosine routers (bounded logits), hyper, deepseek (V3), moepp: none;
    # quantile: Megatron's z-loss on the router's logits
    if router not in ('softmax', 'sigmoid', 'tcmoe', 'quantile'):
        assert aux['z'].item() == 0.0
    else:  # LibMoE's zloss on the gate's raw logits
        l = x.view(-1, D) @ layer.router.gate.weight.t()
        assert aux['z'].item() == pytest.approx(torch.logsumexp(l, -1).square().mean().item(), rel=1e-5)


@pytest.mark.parametrize('router,options', [('cosine', dict(cosine_variant='libmoe')),
                                            ('perturbed_cosine', dict(cosine_variant='libmoe')),
                                            ('hyper', dict(hyper_k_min=2))])
def test_variants_train_in_a_tiny_gpt(router, options):
    """the variants that the default-option tests in test_moe.py do not train: a tiny GPT overfits one batch"""
    torch.manual_seed(0)
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, bias=False,
                    router=router, n_experts=4, top_k=2, expert_hidden=64, router_options=options)
    model = GPT(cfg).train()
    idx = torch.randint(0, 64, (4, 17))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    ce = []
    for step in range(25):
        moe.set_progress(model, step / 24)
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        ce.append(F.cross_entropy(logits.view(-1, 64), idx[:, 1:].reshape(-1)).item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for m in model.moe_layers():  # the router's own parameters learn from the loss
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.router.parameters() if p.requires_grad)
        opt.step()
    assert ce[-1] < 0.6 * ce[0], (ce[0], ce[-1])  # about 0.51 after 25 steps

# -----------------------------------------------------------------------------
# router losses are training losses: none reaches an evaluation's loss

# each router's own loss made large enough to show in a float32 cross-entropy (tcmoe: null p ~ e^-10)
LOUD = dict(remoe_l1_init=1.0, topp_entropy_coef=1.0, null_reward=1e3)


@pytest.mark.parametrize('router', list(moe.ROUTERS))
def test_router_losses_are_zero_in_eval(router):
    """GPT.forward in model.eval() with targets, the balance and z coefficients 0: the loss is the plain
    cross-entropy of the logits, computed here, for every router (grad enabled too: ReMoE's test is
    self.training and torch.is_grad_enabled()). In training the routers with a loss of their own (topp's entropy,
    tcmoe's null reward, remoe's L1) must show it, so a term leaking into eval would fail here"""
    torch.manual_seed(0)
    k = 1 if router == 'switch' else K
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=D, bias=False,
                    router=router, n_experts=E, top_k=k, mlp_hidden=24, aux_loss_coef=0.0, z_loss_coef=0.0,
                    router_options={o: v for o, v in LOUD.items() if o in moe.ROUTERS[router].settings()})
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 9))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            logits, loss, aux = model.eval()(idx[:, :-1], idx[:, 1:], with_aux=True)
        ce = F.cross_entropy(logits.reshape(-1, 64), idx[:, 1:].reshape(-1))
        assert loss.item() == ce.item()
        assert torch.as_tensor(aux['router']).item() == 0.0
    logits, loss, aux = model.train()(idx[:, :-1], idx[:, 1:], with_aux=True)
    ce = F.cross_entropy(logits.reshape(-1, 64), idx[:, 1:].reshape(-1))
    own = router in ('topp', 'tcmoe', 'remoe')
    assert (abs(torch.as_tensor(aux['router']).item()) > 1e-3) == own
    assert (abs(loss.item() - ce.item()) > 1e-3) == own



def source_router_loss(router, x, W, E, k, options):
    """one MoE layer's own training loss from its router's input x (T, d) and gate W, written from the sources:
    topp: coef * mean_t H(softmax(Wx)) (Huang et al. 2024, the dynamic loss); tcmoe: -reward * mean_t (the null
    slots' p), p = softmax(Wx + [0]*E + [-1]*E + [-10]*k) (LibMoE moe_tcmoe.py); remoe: ReMoE router.py's
    load-balanced L1, sum_e relu(Wx)_e.sum(0) * (relu > 0).sum(0) * E * lambda / (T * T * k)"""
    logits = x @ W.t()
    T = x.shape[0]
    if router == 'topp':
        p = logits.softmax(-1)
        return options['topp_entropy_coef'] * -(p * p.log()).sum(-1).mean()
    if router == 'tcmoe':
        p = (logits + torch.tensor([0.0] * E + [-1.0] * E + [-10.0] * k)).softmax(-1)
        return -options['null_reward'] * p[:, 2 * E:].sum(-1).mean()
    probs = torch.relu(logits)
    return (probs.sum(0) * (probs > 0).sum(0)).sum() * (E * options['remoe_l1_init'] / (T * T * k))


@pytest.mark.parametrize('router', ['topp', 'tcmoe', 'remoe'])
def test_router_losses_are_the_mean_over_the_moe_layers(router):
    """GPT.forward in training: the router loss is the mean over the MoE layers of each layer's term, computed here
    from each router's input; three layers, the middle one dense, so a sum over the MoE layers (Megatron, ReMoE:
    2x) and a mean over every layer (2/3x) both fail; docs/routers.md (Aux losses) gives the effect"""
    torch.manual_seed(0)
    options = {o: v for o, v in LOUD.items() if o in moe.ROUTERS[router].settings()}
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=D, bias=False,
                    router=router, n_experts=E, top_k=K, mlp_hidden=24, aux_loss_coef=0.0, z_loss_coef=0.0,
                    dense_layers='1', router_options=options)
    model = GPT(cfg).train()
    layers = model.moe_layers()
    assert len(layers) == 2 and len(model.transformer.h) == 3
    inputs = []
    for m, std in zip(layers, (0.5, 2.0)):  # layers whose terms differ: neither alone is the mean
        with torch.no_grad():
            m.router.gate.weight.normal_(0, std)
        m.router.register_forward_hook(lambda mod, args, out: inputs.append((args[0].detach(), mod)))
    idx = torch.randint(0, 64, (2, 9))
    logits, loss, aux = model(idx[:, :-1], idx[:, 1:], with_aux=True)
    terms = [source_router_loss(router, x, mod.gate.weight.detach(), E, K, options) for x, mod in inputs]
    assert len(terms) == 2 and abs(terms[0] - terms[1]) > 0.1 * abs(terms[0])
    want = sum(terms) / 2
    assert aux['router'].item() == pytest.approx(want.item(), rel=1e-5)
    ce = F.cross_entropy(logits.reshape(-1, 64), idx[:, 1:].reshape(-1))
    assert (loss - ce).item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize('router, loud', [('topp', '--topp_entropy_coef=1.0'), ('tcmoe', '--null_reward=1000.0')])
def test_train_py_evaluation_is_the_cross_entropy_alone(trainer, router, loud):
    """train.py's logged train and val losses at iteration 5 (the checkpoint's weights): the mean over the fixed
    evaluation batches of the plain cross-entropy of the checkpoint's logits, computed here. The batches: eval_iters
    x batch_size offsets from a torch.Generator seeded seed + 1 (val) or seed + 2 (train) (train.py's fixed set).
    The router's own loss is loud and the balance coefficient is on, so a balance, z or router term in the
    evaluation moves the logged loss by 1e-2 or more"""
    from conftest import TINY, config as config_file
    import numpy as np
    from checkpoint import load_model
    args = [*TINY, config_file(router), loud, '--aux_loss_coef=0.01', '--max_iters=5', '--lr_decay_iters=5',
            '--eval_interval=5', '--always_save_checkpoint=True']
    r = trainer.run(args).check()
    model, ckpt = load_model(r.out_dir)
    assert ckpt['iter_num'] == 5
    row = [row for row in r.evals if row['iter'] == 5][0]
    c, data = ckpt['config'], trainer.root / 'data' / ckpt['config']['dataset']
    meta = json.loads((data / 'meta.json').read_text())
    B, S, n = c['batch_size'], c['block_size'], c['eval_iters']
    model.eval()
    for split, offset in (('val', 1), ('train', 2)):
        tokens = np.memmap(data / f'{split}.bin', dtype=meta['dtype'], mode='r')
        g = torch.Generator().manual_seed(c['seed'] + offset)
        starts = torch.randint(meta[f'{split}_tokens'] - S, (n * B,), generator=g).tolist()
        losses = []
        for b in range(n):
            rows = [torch.from_numpy(tokens[i:i + S + 1].astype(np.int64)) for i in starts[b * B:(b + 1) * B]]
            xy = torch.stack(rows)
            with torch.no_grad():
                logits = model(xy[:, :-1])[0]
            losses.append(F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten()).item())
        assert row[f'{split}_loss'] == pytest.approx(sum(losses) / n, rel=1e-5), split
        with torch.no_grad():  # what a leak would add: the model's own loss in eval, balance term included
            _, with_aux = model(xy[:, :-1], xy[:, 1:])
        assert abs(with_aux.item() - losses[-1]) > 5e-3

# -----------------------------------------------------------------------------
# deepseek's balance loss counts the scores' own top-k


@pytest.mark.parametrize('scope', ['sequence', 'batch'])
def test_deepseek_balance_counts_the_plain_top_k(scope):
    """DeepSeek-V3 (arXiv 2412.19437) eq. 17-20, the sequence-wise balance loss: f_i = N_r / (K_r T) sum_t
    1(s_it in Topk({s_jt}, K_r)), the scores WITHOUT the bias (eq. 16 adds it for routing only), P_i = mean_t s_it /
    sum_j s_jt, L = sum_i f_i P_i, per sequence, averaged; Megatron's compute_routing_scores_for_aux_loss takes the
    same plain top-k. Catches f counted from the routed (biased) ids"""
    torch.manual_seed(0)
    B, S = 2, 6
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=D, bias=False,
                    router='deepseek', n_experts=E, top_k=K, mlp_hidden=24, balance_scope=scope)
    layer = moe.MoE(cfg, 24).eval()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
        layer.router.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.0, 0.1]))
    x = torch.randn(B, S, D)
    _, aux = layer(x)
    s = torch.sigmoid(x @ layer.router.gate.weight.t()).detach()  # (B, S, E)
    routed = (s + layer.router.expert_bias).topk(K, dim=-1).indices
    plain = s.topk(K, dim=-1).indices
    assert (routed != plain).any(), 'weak test: the bias changes no selection'
    groups = [(s[b], plain[b]) for b in range(B)] if scope == 'sequence' else [(s.flatten(0, 1), plain.flatten(0, 1))]
    losses = []
    for s_t, top in groups:
        T = s_t.shape[0]
        f = torch.zeros(E)
        for t in range(T):
            for i in top[t].tolist():
                f[i] += E / (K * T)
        P = (s_t / s_t.sum(-1, keepdim=True)).mean(0)
        losses.append((f * P).sum())
    assert aux['balance'].item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


def test_deepseek_bias_counts_the_assignments_before_capacity_drops():
    """the departure docs/routers.md names: the bias update's c counts every routed assignment, the dropped ones
    too; Megatron (router.py local_tokens_per_expert) counts after its drops. 16 tokens routed by hand (one-hot
    inputs, top-1) as [10, 4, 1, 1], capacity ceil(1 * 1 * 16 / 4) = 4 seats [4, 4, 1, 1]; b += u sign(mean(c) - c)
    gives expert 1 no step from the counts before the drops (4 = mean 4) and a step down from those after (4 > 2.5)"""
    torch.manual_seed(0)
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=D, bias=False,
                    router='deepseek', n_experts=E, top_k=1, mlp_hidden=24, capacity_factor=1.0,
                    router_options=dict(bias_update_rate=0.1))
    layers = torch.nn.ModuleList([moe.MoE(cfg, 24)]).train()
    router = layers[0].router
    chosen = [0] * 10 + [1] * 4 + [2, 3]
    x = torch.zeros(1, len(chosen), D)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E, D) * 4.0)
        for t, e in enumerate(chosen):
            x[0, t, e] = 1.0
    layers[0](x)
    c = torch.bincount(torch.tensor(chosen), minlength=E).float()
    seated = c.clamp(max=math.ceil(1.0 * 1 * len(chosen) / E))
    assert c.tolist() == [10, 4, 1, 1] and seated.tolist() == [4, 4, 1, 1]
    assert layers[0].stats()['dropped'] == pytest.approx(6 / 16)  # the capacity did drop
    moe.end_step(layers)
    torch.testing.assert_close(router.expert_bias, 0.1 * torch.sign(c.mean() - c))
    assert not torch.equal(router.expert_bias, 0.1 * torch.sign(seated.mean() - seated))


def test_moepp_constant_vector_starts_at_libmoes_std():
    """LibMoE moe_plus_plus.py: c ~ N(0, 0.002^2) (the official ConstantExpert: std 1), through GPT's init"""
    torch.manual_seed(0)
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=1, n_head=4, n_embd=2048, bias=False,
                    router='moepp', n_experts=E, top_k=K, mlp_hidden=8, expert_hidden=8)
    const = GPT(cfg).moe_layers()[0].router.const
    assert const.shape == (2048,) and abs(const.mean().item()) < 3 * 0.002 / 2048 ** 0.5
    assert const.std().item() == pytest.approx(0.002, rel=0.05)
