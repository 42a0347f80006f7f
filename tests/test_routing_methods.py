"""
Routing methods against their sources: ReMoE (ReLU routing, load-balanced L1 with an adaptive
coefficient), dynamic top-p routing, expert-choice routing, forced balance, the Qwen2-MoE shared-expert gate and the
global-batch balance loss over micro-batches; and the routing contract for a variable number of experts per token
(UNUSED slots) in the balance loss, the statistics, capacity and Drop-Top-1. Each reference is written here from the
source named in its docstring (a transcription or a plain loop), or is a Hugging Face module with copied weights.
The 2-process global balance check is in tests/ep_worker.py (test_ep.py). fp32, CPU, a few seconds.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import SCHEDULE, TINY, config as config_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import moe  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py: tiny tensors run fastest on one thread


def config(router='softmax', E=4, k=2, d=16, **kw):
    return GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=d, bias=False,
                     router=router, n_experts=E, top_k=k, mlp_hidden=24, expert_hidden=24, **kw)


def make_layer(cfg):
    layer = moe.MoE(cfg, cfg.expert_hidden)
    with torch.no_grad():
        for ex in (layer.experts, layer.shared):
            if ex is not None:
                ex.c_fc.normal_(0, cfg.n_embd ** -0.5)
                ex.c_proj.normal_(0, ex.c_proj.shape[-1] ** -0.5)
    return layer


def dense(ids, w, E):
    """(T, K) slots -> (T, E) weight of each (token, expert), 0 where not chosen; UNUSED slots must weigh 0"""
    assert (w[ids < 0] == 0).all()
    out = torch.zeros(ids.shape[0], E)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if ids[t, j] >= 0:
                assert out[t, ids[t, j]] == 0, 'an expert in two slots of one token'
                out[t, ids[t, j]] = w[t, j]
    return out


def check_slot_order(ids, w):
    """the contract: used slots first, by weight, then UNUSED ones"""
    used = ids >= 0
    assert (used[:, 1:] <= used[:, :-1]).all(), 'an UNUSED slot before a used one'
    assert (w[:, 1:] <= w[:, :-1] + 1e-7).all(), 'slots not ordered by weight'

# -----------------------------------------------------------------------------
# ReMoE


def ref_remoe(W, x, k, coef):
    """ReMoE megatron/core/transformer/moe/router.py ReLURouter.l1_reg_load_balancing / apply_l1_reg with
    moe_utils.py switch_load_balancing_loss_func, transcribed:
        probs = relu(logits); routing_map = probs > 0; tokens_per_expert = routing_map.sum(0)
        aggregated_probs_per_expert = probs.sum(dim=0)
        aux_loss = sum(aggregated_probs_per_expert * tokens_per_expert) * (E * coeff / (T * T * topk))"""
    logits = x @ W.t()
    probs = torch.relu(logits)
    routing_map = probs > 0
    T, E = probs.shape
    l1 = torch.sum(probs.sum(dim=0) * routing_map.sum(dim=0)) * (E * coef / (T * T * k))
    return probs, routing_map, l1


def test_remoe_equals_transcription_of_its_source():
    torch.manual_seed(0)
    E, k, T = 8, 2, 24
    cfg = config('remoe', E=E, k=k, router_options=dict(remoe_l1_init=0.01))
    router = moe.ROUTERS['remoe'](cfg).train()
    x = torch.randn(T, 16)
    r = router(x)
    W = router.gate.weight.detach().clone().requires_grad_(True)
    probs, routing_map, l1 = ref_remoe(W, x, k, 0.01)
    assert r.ids.shape == (T, E)  # K = E slots: any number of experts
    check_slot_order(r.ids, r.weights.detach())
    torch.testing.assert_close(dense(r.ids, r.weights.detach(), E), probs.detach())
    assert torch.equal((r.ids >= 0).sum(1), routing_map.sum(1))
    counts = routing_map.sum(1)
    assert counts.min() < counts.max(), 'the case should give tokens different numbers of experts'
    torch.testing.assert_close(r.loss, l1)
    # gradient of the gate through the weights and the L1 penalty, against the transcription's
    R = torch.randn(T, E)
    (g,) = torch.autograd.grad((dense_diff(r.ids, r.weights, E) * R).sum() + r.loss, router.gate.weight)
    (g_ref,) = torch.autograd.grad((probs * R).sum() + l1, W)
    torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)
    router.eval()  # the penalty is a training loss (ReMoE: self.training and torch.is_grad_enabled())
    assert router(x).loss == 0.0


def dense_diff(ids, w, E):
    """(T, K) slots -> (T, E), differentiable: scatter of the used slots' weights"""
    return torch.zeros(ids.shape[0], E + 1).scatter(1, torch.where(ids < 0, E, ids), w)[:, :E]


@pytest.mark.parametrize('shift, grows', [(5.0, True), (-5.0, False)])
def test_remoe_l1_coefficient_adapts_as_remoe_training(shift, grows):
    """ReMoE training.py: sparsity = mean over layers and micro-batches of 1 - nonzero / (T E); coeff *= 1.2 if
    sparsity < 1 - topk / E else /= 1.2. Two layers, two micro-batches; the shift makes every weight positive
    (sparsity 0: the coefficient grows) or every weight zero (sparsity 1: it shrinks)"""
    torch.manual_seed(0)
    E, k = 4, 2
    cfg = config('remoe', E=E, k=k, router_options=dict(remoe_l1_init=1e-3, remoe_l1_alpha=1.2))
    layers = nn.ModuleList([make_layer(cfg), make_layer(cfg)]).train()
    xs = [torch.randn(2, 5, 16) for _ in range(4)]
    nonzero = 0
    for i, x in enumerate(xs):  # layer i % 2, micro-batch i // 2
        layer = layers[i % 2]
        with torch.no_grad():
            layer.router.gate.weight.normal_(0, 0.1)
        column = layer.router.gate.weight[:, 0]
        x[..., 0] = shift * torch.sign(column.sum()) / column.abs().min()
        layer(x)
        nonzero += (x.view(-1, 16) @ layer.router.gate.weight.t() > 0).sum().item()
    layers[0].eval()(torch.randn(1, 3, 16))  # eval forwards are not counted
    with torch.no_grad():
        layers[0](torch.randn(1, 3, 16))
    sparsity = 1 - nonzero / (4 * 10 * E)
    assert (sparsity < 1 - k / E) == grows
    moe.end_step(layers)
    want = 1e-3 * 1.2 if sparsity < 1 - k / E else 1e-3 / 1.2
    for m in layers:
        assert m.router.l1_coef.item() == pytest.approx(want, rel=1e-6)
        assert m.step_counts.sum() == 0 and m.step_tokens == 0  # the next step counts afresh

def remoe_training_update(coeff, routing_maps, num_layers, num_microbatches, topk, num_experts, multiplier):
    """ReMoE megatron/training/training.py (train loop) with router.py l1_reg_load_balancing, transcribed for one
    rank: each layer's forward adds sparsity = 1 - routing_map.sum() / routing_map.numel() to
    config.moe_relu_sparsity; after the step it is divided by num_layers * num_microbatches, and
    target_sparsity = 1 - moe_router_topk / num_moe_experts; coeff *= multiplier if sparsity < target else /="""
    moe_relu_sparsity = 0.0
    for routing_map in routing_maps:
        moe_relu_sparsity += 1 - routing_map.sum().float().item() / routing_map.numel()
    moe_relu_sparsity /= num_layers * num_microbatches
    target_sparsity = 1 - topk / num_experts
    if moe_relu_sparsity < target_sparsity:
        return coeff * multiplier
    return coeff / multiplier


# E = 8, k = 2 (target sparsity 0.75, density 0.25): experts per token in (layer 0, layer 1) for each step, and
# the direction by hand. 1.5 experts: sparsity 0.8125 > 0.75, down (density 0.1875 < 0.75 and the denominator
# T k, 1 - 1.5 / 2 = 0.25, both say up); 3: 0.625, up (the target k / E = 0.25 says down); 2: exactly 0.75,
# down (<= says up); (1, 3.5): the mean over layers, 0.71875, up (the first layer alone says down)
REMOE_STEPS = [((1.5, 1.5), 1 / 1.2), ((3, 3), 1.2), ((2, 2), 1 / 1.2), ((1, 3.5), 1.2), ((1.5, 1.5), 1 / 1.2)]


def experts_per_token(W, mean):
    """sets the gate W (E, d) so that a token whose feature j is 1 has ReLU(Wx) > 0 exactly on experts 0..n_j-1,
    with n_0, n_1 = floor(mean), ceil(mean) (each half of the tokens: the given mean); returns the token maker"""
    low, high = math.floor(mean), math.ceil(mean)
    with torch.no_grad():
        W.fill_(-1.0)
        W[:low, 0] = 1.0
        W[:high, 1] = 1.0

    def tokens(B, S):
        x = torch.zeros(B, S, W.shape[1])
        x.view(-1, W.shape[1])[0::2, 0] = 1.0
        x.view(-1, W.shape[1])[1::2, 1] = 1.0
        return x
    return tokens


def test_remoe_coefficient_direction_with_e_not_2k_against_training_py():
    """E = 8, k = 2: sparsity (0.75 target) and density (0.25) differ, so mixing up the target, the denominator or
    the comparison turns the update the other way; two layers, two micro-batches per step, five steps, each step's
    lambda against the transcription of ReMoE's training.py and against the direction written above"""
    E, k = 8, 2
    cfg = config('remoe', E=E, k=k, router_options=dict(remoe_l1_init=1e-3, remoe_l1_alpha=1.2))
    layers = nn.ModuleList([make_layer(cfg), make_layer(cfg)]).train()
    coeff = 1e-3
    for means, factor in REMOE_STEPS:
        makers = [experts_per_token(m.router.gate.weight, mean) for m, mean in zip(layers, means)]
        maps = []
        for _ in range(2):  # micro-batches
            for m, tokens in zip(layers, makers):
                x = tokens(2, 5)
                m(x)
                maps.append(torch.relu(x.view(-1, 16) @ m.router.gate.weight.t()) > 0)
        assert [mp.sum(1).float().mean().item() for mp in maps[:2]] == list(means)
        moe.end_step(layers)
        want = remoe_training_update(coeff, maps, 2, 2, k, E, 1.2)
        assert want == pytest.approx(coeff * factor, rel=1e-12)  # the transcription agrees with the table
        coeff = want
        for m in layers:
            assert m.router.l1_coef.item() == pytest.approx(coeff, rel=1e-5)



def test_remoe_sparsity_is_over_the_moe_layers():
    """the departure docs/routers.md names: ReMoE's training.py divides the layers' summed sparsity by num_layers,
    every layer; here by the MoE layers. Three layers, the middle one dense, zero gates (sparsity 1 in each MoE
    layer, above the target 0.75): the mean over the MoE layers is 1 and lambda goes down; ReMoE's division by 3
    gives 2/3 and would send it up"""
    E, k = 8, 2
    cfg = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=3, n_head=4, n_embd=16, bias=False,
                    router='remoe', n_experts=E, top_k=k, mlp_hidden=24, expert_hidden=24, dense_layers='1',
                    router_options=dict(remoe_l1_init=1e-3, remoe_l1_alpha=1.2))
    model = GPT(cfg).train()
    layers = model.moe_layers()
    assert len(layers) == 2
    for m in layers:
        with torch.no_grad():
            m.router.gate.weight.zero_()
    model(torch.randint(0, 64, (2, 8)))
    maps = [torch.zeros(16, E, dtype=torch.bool) for _ in layers]  # ReLU(0) = 0: no expert anywhere
    assert remoe_training_update(1e-3, maps, 3, 1, k, E, 1.2) == pytest.approx(1e-3 * 1.2)  # ReMoE's rule
    want = remoe_training_update(1e-3, maps, len(layers), 1, k, E, 1.2)
    assert want == pytest.approx(1e-3 / 1.2)
    moe.end_step(model)
    assert all(m.router.l1_coef.item() == pytest.approx(want, rel=1e-6) for m in layers)

# -----------------------------------------------------------------------------
# dynamic top-p


def ref_topp(p, threshold, most):
    """Dynamic_MoE modeling_moe.py top_p_sampling_batched_all_sequence as a loop: experts by decreasing p, each
    kept while the cumulative p before it is <= threshold (the code keeps cumsum <= p and the first cumsum > p)"""
    T, E = p.shape
    out = torch.zeros(T, E)
    for t in range(T):
        total = 0.0
        for e in sorted(range(E), key=lambda e: -p[t, e].item())[:most]:
            out[t, e] = p[t, e]
            total += p[t, e].item()
            if total > threshold:
                break
    return out


@pytest.mark.parametrize('threshold, most', [(0.4, 0), (0.7, 3)])
def test_topp_equals_transcription_of_its_source(threshold, most):
    torch.manual_seed(0)
    E, T = 8, 32
    cfg = config('topp', E=E, k=2, router_options=dict(topp_threshold=threshold, topp_max=most,
                                                       topp_entropy_coef=1e-2))
    router = moe.ROUTERS['topp'](cfg).train()
    with torch.no_grad():
        router.gate.weight.normal_(0, 1.0)  # peaked and flat tokens both
    x = torch.randn(T, 16)
    r = router(x)
    p = torch.softmax(x @ router.gate.weight.t(), -1)
    want = ref_topp(p.detach(), threshold, most or E)
    assert r.ids.shape == (T, most or E)
    check_slot_order(r.ids, r.weights.detach())
    torch.testing.assert_close(dense(r.ids, r.weights.detach(), E), want)
    n = (want > 0).sum(1)
    assert n.min() < n.max(), 'the case should give tokens different numbers of experts'
    torch.testing.assert_close(r.probs, p)
    entropy = sum(-sum(v * math.log(v) for v in row) for row in p.tolist()) / T  # the paper's dynamic loss
    assert r.loss.item() == pytest.approx(1e-2 * entropy, rel=1e-5)
    assert r.logits is None  # the paper: no z-loss
    (g,) = torch.autograd.grad(r.loss, router.gate.weight)
    assert g.abs().sum() > 0

def source_top_p(probs, top_p):
    """Dynamic_MoE modeling/modeling_moe.py top_p_sampling_batched_all_sequence, transcribed line by line (its
    caller, SwitchMLP.forward, passes softmax(router(x)) and top_p_threshold; temperature 1)"""
    sorted_probs, sorted_indices = torch.sort(probs, descending=True)
    cumulative_probs = torch.cumsum(sorted_probs, dim=-1)
    mask = cumulative_probs > top_p
    threshold_indices = mask.long().argmax(dim=-1)
    threshold_mask = torch.nn.functional.one_hot(threshold_indices, num_classes=sorted_indices.size(-1)).bool()
    mask = mask & ~threshold_mask
    sorted_indices = torch.where(mask, -1, sorted_indices)
    sorted_probs = torch.where(mask, 0.0, sorted_probs)
    return sorted_probs, sorted_indices


# probabilities exact in binary whose cumulative sums hit the threshold exactly, (threshold, rows, experts kept)
TIES = [
    (0.5, [[0.5, 0.5, 0.0, 0.0]], 2),  # p = [0.5, 0.5] at 0.5: the cumsum 0.5 is not above it, one more expert
    (0.5, [[0.25, 0.25, 0.25, 0.25]], 3),  # all equal: 0.25, 0.5 (not above), 0.75 crosses
    (0.25, [[0.25, 0.25, 0.25, 0.25]], 2),
    (0.75, [[0.5, 0.25, 0.125, 0.125]], 3),  # 0.5, 0.75 (not above), 0.875 crosses
    (0.625, [[0.375, 0.25, 0.25, 0.125]], 3),  # a tie between the 2nd and 3rd expert, at the threshold
    (1.0, [[0.5, 0.25, 0.125, 0.125]], 4),  # never above: every expert (the source's argmax of no True is 0)
]


@pytest.mark.parametrize('threshold, rows, kept', TIES)
def test_topp_ties_at_the_threshold_are_the_sources(threshold, rows, kept):
    """ties decide the count through the comparison: the source keeps going while cumsum <= threshold (strict >
    stops it). Catches: >= for > (keeps one fewer in every case but the last), the crossing expert left out
    (one fewer), a cumsum that excludes the expert itself with < (= the >= variant)"""
    p = torch.tensor(rows)
    router = moe.ROUTERS['topp'](config('topp', E=4, k=2, router_options=dict(topp_threshold=threshold)))
    w, ids = router.select(p)
    src_w, src_ids = source_top_p(p, threshold)
    assert torch.equal(ids, src_ids) and torch.equal(w, src_w)
    assert (ids >= 0).sum().item() == kept  # and the count written above, by hand


@pytest.mark.parametrize('E, threshold, kept', [(2, 0.5, 2), (4, 0.5, 3), (4, 0.75, 4), (8, 0.5, 5)])
def test_topp_router_on_exact_uniform_probabilities(E, threshold, kept):
    """through forward: a zero gate gives softmax = 1/E exactly (E a power of 2), so every token's cumsum meets the
    threshold exactly; the source's rule takes kept = E * threshold + 1 experts (>= would take one fewer)"""
    cfg = config('topp', E=E, k=2, router_options=dict(topp_threshold=threshold))
    router = moe.ROUTERS['topp'](cfg).eval()
    with torch.no_grad():
        router.gate.weight.zero_()
    x = torch.randn(6, 16)
    r = router(x)
    assert torch.equal(r.probs, torch.full((6, E), 1 / E))
    src_w, src_ids = source_top_p(r.probs, threshold)
    assert torch.equal(r.ids, src_ids) and torch.equal(r.weights, src_w)
    assert ((r.ids >= 0).sum(1) == kept).all()

# -----------------------------------------------------------------------------
# expert choice


def flaxformer_capacity(capacity_factor, tokens_per_group, num_experts, min_expert_capacity=4):
    """flaxformer architectures/moe/moe_layers.py MoeLayer.__call__, transcribed: 'Each group will send
    expert_capacity tokens to each expert.' (its capacity_factor is the paper's c = cf * k here)"""
    expert_capacity = int(round(capacity_factor * tokens_per_group / num_experts))
    expert_capacity = max(expert_capacity, min_expert_capacity)
    return expert_capacity


def flaxformer_experts_choose(router_probs, expert_capacity):
    """flaxformer architectures/moe/routing.py ExpertsChooseMaskedRouter._compute_routing_instructions for one
    group, as a loop: each expert's top expert_capacity tokens by jax.lax.top_k ('If two elements are equal, the
    lower-index element appears first'); combine_array = expert_gate at those (token, expert) -> (T, E)"""
    T, E = router_probs.shape
    combine = torch.zeros(T, E)
    for e in range(E):
        for t in sorted(range(T), key=lambda t: (-router_probs[t, e].item(), t))[:expert_capacity]:
            combine[t, e] = router_probs[t, e]
    return combine


# (T, ec_capacity_factor, C) with E = 4, k = 2: C = round(cf * T * k / E), Python's round (half to even), >= 4
CAPACITIES = [
    (21, 1.0, 10),  # 10.5: ceil and round-half-up give 11
    (23, 1.0, 12),  # 11.5: floor gives 11
    (19, 1.0, 10),  # 9.5: floor gives 9
    (30, 0.75, 11),  # 11.25: ceil gives 12
    (20, 1.0, 10),  # whole
    (6, 1.0, 4),  # 3: flaxformer's min_expert_capacity
    (13, 0.5, 4),  # 3.25 -> 3 -> 4
]


@pytest.mark.parametrize('T, cf, C', CAPACITIES)
def test_expert_choice_capacity_and_selection_are_flaxformers(T, cf, C):
    """a fractional C = cf T k / E: the count per expert and the tokens chosen, against flaxformer's capacity and
    ExpertsChooseMaskedRouter (one group: the micro-batch). Catches ceil, floor, round half up, a missing minimum,
    and a missing factor k (C halves)"""
    torch.manual_seed(T)
    E, k = 4, 2
    assert flaxformer_capacity(cf * k, T, E) == C  # the table above, by hand
    cfg = config('expert_choice', E=E, k=k, router_options=dict(ec_capacity_factor=cf))
    router = moe.ROUTERS['expert_choice'](cfg).train()
    x = torch.randn(T, 16)
    r = router(x)
    S = torch.softmax(x @ router.gate.weight.t(), -1).detach()
    want = flaxformer_experts_choose(S, C)
    check_slot_order(r.ids, r.weights.detach())
    torch.testing.assert_close(dense(r.ids, r.weights.detach(), E), want)
    assert ((want > 0).sum(0) == C).all()  # balanced by construction
    assert torch.equal(moe.expert_load(r.ids, E), torch.full((E,), C))


def test_expert_choice_ties_go_to_the_earlier_token():
    """a zero gate gives p = 1/E for every (token, expert): jax.lax.top_k takes the lower index, so every expert
    takes tokens 0..C-1 and the later tokens get none (an unstable sort would pick other tokens)"""
    E, k, T = 4, 2, 40
    cfg = config('expert_choice', E=E, k=k)
    router = moe.ROUTERS['expert_choice'](cfg).train()
    with torch.no_grad():
        router.gate.weight.zero_()
    r = router(torch.randn(T, 16))
    C = flaxformer_capacity(1.0 * k, T, E)
    torch.testing.assert_close(dense(r.ids, r.weights, E), flaxformer_experts_choose(r.probs, C))
    assert ((r.ids >= 0).sum(1) == torch.tensor([E] * C + [0] * (T - C))).all()


def test_expert_choice_capacity_at_most_the_group():
    """a group smaller than the minimum: flaxformer's top_k would fail (k > tokens); here every expert takes every
    token (C = T)"""
    router = moe.ROUTERS['expert_choice'](config('expert_choice', E=4, k=2)).train()
    assert router.capacity(3) == 3
    r = router(torch.randn(3, 16))
    assert ((r.ids >= 0).sum(1) == 4).all()


def test_expert_choice_eval_is_causal():
    """Zhou et al. 2022 route over the batch (not causal); eval here: each token's own top-k of p, weights p"""
    torch.manual_seed(0)
    E, k, T = 4, 2, 20
    cfg = config('expert_choice', E=E, k=k)
    router = moe.ROUTERS['expert_choice'](cfg).eval()
    x = torch.randn(T, 16)
    S = torch.softmax(x @ router.gate.weight.t(), -1).detach()
    r = router(x)
    v, i = S.topk(k, -1)
    assert torch.equal(r.ids, i)
    torch.testing.assert_close(r.weights, v)
    # an eval forward of the whole MoE layer: a token's output does not depend on later tokens
    layer = make_layer(cfg).eval()
    xb = torch.randn(1, 10, 16)
    later = xb.clone()
    later[:, 6:] = torch.randn(1, 4, 16)
    torch.testing.assert_close(layer(xb)[0][:, :6], layer(later)[0][:, :6])

# -----------------------------------------------------------------------------
# dispatch of a variable number of experts per token, in training (expert choice routes by the batch there)


def swiglu(x, c_fc, c_proj):
    g, u = (x @ c_fc.t()).chunk(2, dim=-1)
    return (g * torch.sigmoid(g) * u) @ c_proj.t()


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
@pytest.mark.parametrize('router', ['remoe', 'topp', 'expert_choice'])
def test_training_dispatch_of_variable_routers_matches_naive_loop(router, impl):
    """y_t = sum over the token's used slots of w * expert_e(x_t), UNUSED slots skipped, against the layer's
    output and every gradient (x, router, experts), grouped and loop expert paths"""
    torch.manual_seed(0)
    layer = make_layer(config(router, E=4, k=2, expert_impl=impl)).train()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
    x = torch.randn(2, 10, 16, requires_grad=True)
    R = torch.randn(2, 10, 16)
    y, _ = layer(x)
    params = dict(layer.named_parameters())
    g = torch.autograd.grad((y * R).sum(), [x, *params.values()])
    P = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    xr = x.detach().clone().requires_grad_()
    xf = xr.view(-1, 16)
    r = torch.func.functional_call(layer.router, {'gate.weight': P['router.gate.weight']}, (xf,))
    assert (r.ids < 0).any(), 'the case should have UNUSED slots'
    rows = []
    for t in range(xf.shape[0]):
        yt = torch.zeros(16)
        for j in range(r.ids.shape[1]):
            e = int(r.ids[t, j])
            if e >= 0:
                yt = yt + r.weights[t, j] * swiglu(xf[t], P['experts.c_fc'][e], P['experts.c_proj'][e])
        rows.append(yt)
    y_ref = torch.stack(rows).view_as(y)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    g_ref = torch.autograd.grad((y_ref * R).sum(), [xr, *P.values()])
    for name, a, b in zip(['x', *params], g, g_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f'grad of {name}: {m}')

# -----------------------------------------------------------------------------
# forced balance


@pytest.mark.parametrize('router', list(moe.ROUTERS))
def test_force_balance_gives_every_expert_the_same_load(router):
    """torchtitan TokenChoiceTopKRouter._debug_force_load_balance_routing: ids = arange(T k).reshape(T, k) % E,
    weights = the router's scores gathered there (here its balance-loss probabilities)"""
    torch.manual_seed(0)
    E, k = 4, 1 if router == 'switch' else 2
    layer = make_layer(config(router, E=E, k=k, force_balance=True)).eval()
    x = torch.randn(2, 6, 16)
    with moe.analysis(layer, record=True) as records:
        layer(x)
    ids, w = records[0].pop()
    T = 12
    want = torch.arange(T * k).reshape(T, k) % E
    assert torch.equal(ids, want)
    r = layer.router(x.view(T, 16))
    torch.testing.assert_close(w, r.probs.gather(1, want))
    assert layer.load.tolist() == [T * k / E] * E
    assert layer.stats()['experts_per_token'] == k


def test_force_balance_keeps_the_router_trained():
    torch.manual_seed(0)
    layer = make_layer(config('softmax', force_balance=True)).train()
    y, aux = layer(torch.randn(2, 6, 16))
    y.square().sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0

# -----------------------------------------------------------------------------
# Qwen2-MoE gated shared expert


def test_shared_gate_equals_hf_qwen2_moe():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    torch.manual_seed(0)
    cfg = config('softmax', E=4, k=2, router_renorm=False, n_shared_experts=1, shared_gate=True)
    layer = make_layer(cfg)
    hf = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=24, shared_expert_intermediate_size=24, num_experts=4,
                        num_experts_per_tok=2, norm_topk_prob=False, hidden_act='silu')
    hf._experts_implementation = 'eager'
    block = Qwen2MoeSparseMoeBlock(hf).eval()
    with torch.no_grad():
        nn.init.normal_(layer.shared_gate.weight, 0, 0.3)
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.c_fc)
        block.experts.down_proj.copy_(layer.experts.c_proj)
        block.shared_expert.gate_proj.weight.copy_(layer.shared.c_fc[0, :24])
        block.shared_expert.up_proj.weight.copy_(layer.shared.c_fc[0, 24:])
        block.shared_expert.down_proj.weight.copy_(layer.shared.c_proj[0])
        block.shared_expert_gate.weight.copy_(layer.shared_gate.weight)
    x = torch.randn(2, 8, 16)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = layer(x1)[0], block(x2)
    torch.testing.assert_close(y1, y2, atol=ATOL, rtol=RTOL)
    R = torch.randn_like(x)
    g1 = torch.autograd.grad((y1 * R).sum(), [x1, layer.shared_gate.weight, layer.shared.c_proj])
    g2 = torch.autograd.grad((y2 * R).sum(),
                             [x2, block.shared_expert_gate.weight, block.shared_expert.down_proj.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.view_as(b), b, atol=ATOL, rtol=RTOL)


def test_shared_gate_needs_shared_experts():
    with pytest.raises(ValueError, match='n_shared_experts'):
        config('softmax', shared_gate=True)

# -----------------------------------------------------------------------------
# global-batch balance over micro-batches (one process; two processes: tests/ep_worker.py)


def by_hand_balance(probs, counts):
    """Switch / Megatron: E * sum_e f_e P_e, f from the given counts, P the mean of these probabilities"""
    f = counts / counts.sum()
    return probs.shape[1] * (f * probs.mean(0)).sum()


def test_global_balance_accumulates_the_steps_micro_batches():
    """Megatron router.py _apply_global_aux_loss: at micro-batch m, f from the counts of micro-batches 1..m of the
    step (global_tokens_per_expert += ..., averaged over ga_steps: the same shares), P from micro-batch m only;
    reset after the step (finalize_model_grads -> reset_global_aux_loss_tracker)"""
    torch.manual_seed(0)
    E = 4
    layer = make_layer(config('softmax', E=E, balance_scope='global')).train()
    xs = [torch.randn(2, 6, 16) for _ in range(3)]
    counts, losses = [], []
    for x in xs:
        r = layer.router(x.view(-1, 16))
        counts.append(torch.stack([(r.ids == e).sum() for e in range(E)]).float())
        losses.append((layer(x)[1]['balance'], r.probs))
    torch.testing.assert_close(losses[0][0], by_hand_balance(losses[0][1], counts[0]))
    torch.testing.assert_close(losses[1][0], by_hand_balance(losses[1][1], counts[0] + counts[1]))
    assert abs(losses[1][0].item() - by_hand_balance(losses[1][1], counts[1]).item()) > 1e-4  # differs from 'batch'
    moe.end_step(layer)
    _, aux = layer(xs[2])
    torch.testing.assert_close(aux['balance'], by_hand_balance(losses[2][1], counts[2]))  # a new step
    with torch.no_grad():  # not a training step: the micro-batch's own counts, nothing accumulated
        _, aux = layer(xs[0])
    torch.testing.assert_close(aux['balance'], by_hand_balance(losses[0][1], counts[0]))
    # the gradient treats f as a constant, P local
    moe.end_step(layer)
    layer(xs[0])
    x = xs[1]
    _, aux = layer(x)
    (g,) = torch.autograd.grad(aux['balance'], layer.router.gate.weight)
    W = layer.router.gate.weight.detach().clone().requires_grad_(True)
    p = torch.softmax(x.view(-1, 16) @ W.t(), -1)
    (g_ref,) = torch.autograd.grad(by_hand_balance(p, counts[0] + counts[1]), W)
    torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)


def test_balance_scope_errors():
    with pytest.raises(ValueError, match='balance_scope'):
        config(balance_scope='step')
    # an older checkpoint's balance_per_sequence=True reads as balance_scope='sequence'
    assert checkpoint.upgrade(dict(balance_per_sequence=True, n_layer=2)) == dict(balance_scope='sequence', n_layer=2)
    assert checkpoint.upgrade(dict(balance_per_sequence=False, n_layer=2)) == dict(n_layer=2)

# -----------------------------------------------------------------------------
# the contract: UNUSED slots in the losses, statistics, capacity and Drop-Top-1


def test_unused_slots_are_never_counted_by_hand():
    U = moe.UNUSED
    E = 4
    ids = torch.tensor([[0, U, U], [1, 2, U], [3, 0, 1], [U, U, U]])
    w = torch.tensor([[0.9, 0.0, 0.0], [0.5, 0.3, 0.0], [0.4, 0.3, 0.2], [0.0, 0.0, 0.0]])
    probs = torch.full((4, E), 0.25)
    probs[:, 0] = 0.4
    probs[:, 1:] = 0.2
    # 6 assignments: expert 0 twice, 1 twice, 2 once, 3 once
    assert moe.expert_load(ids, E).tolist() == [2, 2, 1, 1]
    want = E * (2 / 6 * 0.4 + 2 / 6 * 0.2 + 1 / 6 * 0.2 + 1 / 6 * 0.2)
    assert moe.balance_loss(probs, ids).item() == pytest.approx(want, rel=1e-6)
    # Drop-Top-1: the first slot goes, the rest scaled to the total; a token with nothing left gets nothing
    d_ids, d_w = moe.drop_top1(ids, w)
    assert torch.equal(d_ids, ids[:, 1:])
    torch.testing.assert_close(d_w, torch.tensor([[0.0, 0.0], [0.8, 0.0], [0.54, 0.36], [0.0, 0.0]]))
    # the layer's statistics: experts per token and the share of negative weights count used slots only
    layer = make_layer(config('softmax', E=E))
    layer.record_stats(ids, w, moe.expert_load(ids, E).float(), torch.tensor(0), training_step=True)
    s = layer.stats()
    assert s['experts_per_token'] == pytest.approx(6 / 4)
    assert s['load'] == [2, 2, 1, 1] and s['negative'] == 0.0
    assert layer.sums[5].item() == 6  # used slots
    assert layer.step_tokens.item() == 4


def test_variable_router_capacity_uses_top_k():
    """capacity = ceil(cf * top_k * T / E) whatever the number of slots K; the overflow of each expert dropped"""
    torch.manual_seed(0)
    E, k = 4, 1
    cfg = config('topp', E=E, k=k, capacity_factor=1.0, router_options=dict(topp_threshold=0.9))
    layer = make_layer(cfg).train()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.3)
    x = torch.randn(2, 8, 16)
    layer(x)
    load = layer.load
    cap = math.ceil(1.0 * k * 16 / E)
    assert load.sum() > 16 * k  # more than k experts per token on average: drops
    dropped = (load - cap).clamp_min(0).sum()
    assert dropped > 0
    assert layer.stats()['dropped'] == pytest.approx((dropped / load.sum()).item())

# -----------------------------------------------------------------------------
# train.py: ReMoE's coefficient after each optimizer step


def test_train_updates_remoe_coefficient_each_step(trainer):
    """the log's experts per token (log_interval=1: one step's training forwards) give each step's sparsity
    1 - ept / E; lambda must have moved by 1.2 per step as ReMoE training.py; it is in the checkpoint"""
    run = trainer.run([*TINY, config_file('remoe'), *SCHEDULE, '--max_iters=4', '--eval_interval=4']).check()
    assert 'experts/token' in run.out
    E, k = 8, 2
    lam = 1e-8
    for row in sorted(run.train, key=lambda r: r['iter']):
        lam *= 1.2 if 1 - row['experts_per_token'] / E < 1 - k / E else 1 / 1.2
    ckpt = torch.load(run.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    coefs = {v.item() for n, v in ckpt['model'].items() if n.endswith('router.l1_coef')}
    assert len(coefs) == 1 and coefs.pop() == pytest.approx(lam, rel=1e-5)
    assert len(run.train) == 4
