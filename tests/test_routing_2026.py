"""The routing methods of Megatron-core and torchtitan (2026) against plain transcriptions of their
source files, written here: the sqrtsoftplus score function (Megatron moe_utils.py
topk_routing_with_score_function and compute_routing_scores_for_aux_loss), the expert bias's
updates over several steps and micro-batches, the counts behind them (training forwards with
gradients only, once under activation recomputation); then through train.py (resume), expert
parallelism (tests/ep_worker.py, tests/test_ep.py) and the remote-code export.
python -m pytest -q -n 0 tests/test_routing_2026.py"""
import pytest
import torch
import torch.nn.functional as F

import moe
from conftest import SCHEDULE, TINY, config
from model import GPT, GPTConfig

torch.set_num_threads(1)


def layer_config(router='deepseek', E=8, k=2, **options):
    return GPTConfig(n_embd=16, n_head=4, n_layer=2, block_size=16, vocab_size=64, router=router,
                     n_experts=E, top_k=k, bias=False, router_options=options)


def perturbed(router):
    torch.manual_seed(0)
    with torch.no_grad():
        router.gate.weight.normal_(0, 1.0)
        router.expert_bias.normal_(0, 0.1)
    return router

# -----------------------------------------------------------------------------
# Megatron moe_utils.py, transcribed (the non-fused path)


def megatron_topk_routing(logits, topk, score_function, expert_bias=None, scaling_factor=None):
    """topk_routing_with_score_function for sigmoid / sqrtsoftplus, no groups: (probs (T, K), top
    indices (T, K))"""
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        scores = torch.nn.functional.softplus(logits.float()).sqrt()
    if expert_bias is not None:
        scores_for_routing = scores + expert_bias.float()
        _, top_indices = torch.topk(scores_for_routing, k=topk, dim=1)
        scores = torch.gather(scores, dim=1, index=top_indices)
    else:
        scores, top_indices = torch.topk(scores, k=topk, dim=1)
    probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    if scaling_factor:
        probs = probs * scaling_factor
    return probs.type_as(logits), top_indices


def megatron_aux_scores(logits, topk):
    """compute_routing_scores_for_aux_loss, sqrtsoftplus: (routing map (T, E), scores (T, E))"""
    scores = torch.nn.functional.softplus(logits.float()).sqrt()
    scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    _, top_indices = torch.topk(scores, k=topk, dim=1)
    return torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool(), scores


@pytest.mark.parametrize('k', [1, 2, 3])
def test_sqrtsoftplus_is_megatrons_score_function(k):
    """ids, weights (times the routed scale, as the layer applies it), balance probabilities and the
    balance loss's plain top-k against the transcription, with a bias that changes the selection"""
    router = perturbed(moe.DeepSeekRouter(layer_config(k=k, score_function='sqrtsoftplus')))
    x = torch.randn(64, 16)
    r = router(x)
    logits = router.gate(x)
    probs, idx = megatron_topk_routing(logits, k, 'sqrtsoftplus', router.expert_bias, 1.5)
    assert torch.equal(r.ids, idx)
    torch.testing.assert_close(r.weights * 1.5, probs, rtol=1e-6, atol=0)
    routing_map, scores = megatron_aux_scores(logits, k)
    torch.testing.assert_close(r.probs, scores, rtol=1e-6, atol=0)
    plain = torch.zeros_like(routing_map).scatter(1, r.balance_ids, True)
    assert torch.equal(plain, routing_map)
    # the bias did change some selections (else the test would not see it used)
    assert not torch.equal(r.ids, r.balance_ids)


def test_sqrtsoftplus_differs_from_sigmoid_and_the_layer_scales_it():
    layer = make_layer(score_function='sqrtsoftplus')
    layer.routed_scale = 1.5
    x = torch.randn(2, 8, 16)
    r = layer.router(x.view(-1, 16))
    sig = moe.DeepSeekRouter(layer_config())
    sig.load_state_dict(layer.router.state_dict())
    assert not torch.allclose(sig(x.view(-1, 16)).weights, r.weights)
    # the layer's output: the experts' outputs weighted by 1.5 times the renormalised scores
    y, _ = layer(x)
    want = torch.zeros(16, 16)
    for t in range(16):
        for j in range(2):
            e = r.ids[t, j]
            h = F.gelu(x.view(-1, 16)[t] @ layer.experts.c_fc[e].t(), approximate='tanh')
            want[t] += 1.5 * r.weights[t, j] * (h @ layer.experts.c_proj[e].t())
    torch.testing.assert_close(y.view(-1, 16), want, rtol=1e-5, atol=1e-6)


def test_sqrtsoftplus_is_finite_for_very_negative_logits():
    """logits down to -1e4: no NaN in the weights, the balance probabilities or any gradient (sglang
    #34459: a naive log(1 + e^l) is 0 below -16.6, sqrt's gradient at 0 is infinite)"""
    layer = make_layer(score_function='sqrtsoftplus')
    with torch.no_grad():
        layer.router.gate.weight.fill_(-1.0)
        layer.router.gate.weight[:, 0] = -torch.linspace(0, 1e4, 8)
    x = torch.zeros(2, 8, 16)
    x[..., 0] = torch.linspace(1, 2, 16).view(2, 8)
    y, aux = layer(x)
    s = moe.sqrtsoftplus(layer.router.gate(x.view(-1, 16)))
    assert (s > 0).all() and s.min() < 1e-18  # the floor, where softplus underflows
    (y.sum() + aux['balance']).backward()
    assert torch.isfinite(y).all() and torch.isfinite(aux['balance'])
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert layer.router.gate.weight.grad.abs().sum() > 0
    # where softplus is representable the value is the exact sqrt(softplus)
    l = torch.tensor([-80.0, -20.0, 0.0, 30.0])
    exact = torch.log1p(torch.exp(l.double())).sqrt().float()
    torch.testing.assert_close(moe.sqrtsoftplus(l), exact)


def test_score_function_is_checked():
    with pytest.raises(ValueError, match="score_function='softmax'"):
        moe.DeepSeekRouter(layer_config(score_function='softmax'))

# -----------------------------------------------------------------------------
# through train.py (resume) and the remote-code export


def config_args(name, *extra):
    return [*TINY, config(name), *SCHEDULE, *extra]


def assert_same_losses(run, ref, iters, rel=1e-6):
    got, want = run.losses(), ref.losses()
    assert set(iters) <= set(got), run.out[-3000:]
    bad = {i: (got[i], want[i]) for i in iters if got[i] != pytest.approx(want[i], rel=rel)}
    assert not bad, bad


def resumed_equals_full(trainer, name):
    """10 steps in one run against 5, a checkpoint, and 5 more from it: the routers' state (the
    bias, quantile's beta) travels in the checkpoint"""
    full = trainer.run(config_args(name)).check()
    half = trainer.run(config_args(name, '--max_iters=5')).check()
    resumed = trainer.resume(half.out_dir, config_args(name)).check()
    assert sorted(resumed.losses()) == list(range(6, 11)), resumed.out
    assert_same_losses(resumed, full, range(6, 11))
    return full, half


def test_recentred_bias_resumes_and_trains_at_ep2_as_one_process(trainer):
    """configs/deepseek_torchtitan.py: resumed as the uninterrupted run, and at ep_size=2 over 2
    processes (the counts summed over the ranks, then re-centred) as one process; the bias stays at
    mean 0"""
    full, half = resumed_equals_full(trainer, 'deepseek_torchtitan')
    two = trainer.run(config_args('deepseek_torchtitan', '--ep_size=2', '--max_iters=5'), nproc=2).check()
    assert_same_losses(two, full, range(1, 6), rel=1e-5)
    # the 5-step run's checkpoint against the one of 2 processes
    a, b = (torch.load(r.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)['model']
            for r in (half, two))
    for i in range(2):
        name = f'transformer.h.{i}.mlp.router.expert_bias'
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7)
        assert a[name].abs().max() > 0 and a[name].mean().abs() < 1e-7


def test_sqrtsoftplus_resumes_exactly(trainer):
    full, _ = resumed_equals_full(trainer, 'sqrtsoftplus')
    ckpt = torch.load(full.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['model_args']['router_options']['score_function'] == 'sqrtsoftplus'
    # the bias moved: 10 steps of u = 1e-3 sign steps
    bias = ckpt['model']['transformer.h.0.mlp.router.expert_bias']
    assert bias.abs().max() > 0


@pytest.mark.parametrize('router, options, kw', [
    ('deepseek', dict(score_function='sqrtsoftplus'), {}),
    ('quantile', dict(qb_score_function='sqrtsoftplus'), {}),
    ('softmax', {}, dict(moe_latent_size=8, n_shared_experts=1, arch='llama', bias=False))])
def test_remote_code_export(tmp_path, router, options, kw):
    """the exported model's logits are ours, with the routers' state (bias, beta) moved off 0;
    latent experts, which no transformers class has, go to remote code"""
    import export
    from test_export import assert_same_logits, exported, tiny
    model = tiny(router=router, n_experts=4, top_k=2, router_options=options, **kw)
    assert export.native_arch(model.config) is None
    assert model.config.router_options.items() >= options.items()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith('qb_beta'):
                b.normal_(0, 0.5)
    folder = exported(tmp_path, model, remote_code=True)
    assert_same_logits(model, folder, 'NanoMoEForCausalLM')

# -----------------------------------------------------------------------------
# the expert bias's update and its counts


def torchtitan_update(expert_bias_E, tokens_per_expert_E, load_balance_coeff):
    """torchtitan components/optimizer/optimizer.py _update_expert_bias, one layer"""
    expert_bias_delta_E = load_balance_coeff * torch.sign(
        tokens_per_expert_E.mean() - tokens_per_expert_E)
    expert_bias_delta_E = expert_bias_delta_E - expert_bias_delta_E.mean()
    return expert_bias_E + expert_bias_delta_E


def megatron_update(expert_bias, tokens_per_expert, expert_bias_update_rate):
    """Megatron moe_utils.py get_updated_expert_bias (one rank: no all-reduce)"""
    average_tokens = tokens_per_expert.sum(dim=-1, keepdim=True) / tokens_per_expert.shape[-1]
    offset = average_tokens - tokens_per_expert
    return expert_bias + torch.sign(offset) * expert_bias_update_rate


def recorded_ids(model):
    """each MoE layer's router ids of every training forward with gradients, kept by hand"""
    seen = [[] for _ in model.moe_layers()]
    for m, ids in zip(model.moe_layers(), seen):
        def recording(x, prev, m=m, fwd=m.router.forward, ids=ids):
            r = fwd(x, prev)
            if m.training and torch.is_grad_enabled():
                ids.append(r.ids.clone())
            return r
        m.router.forward = recording
    return seen


@pytest.mark.parametrize('recentre', [True, False])
@pytest.mark.parametrize('score_function', ['sigmoid', 'sqrtsoftplus'])
def test_bias_update_over_steps_and_micro_batches(recentre, score_function):
    """three optimizer steps of two micro-batches each, two MoE layers: each layer's bias after each
    step is the source's update (torchtitan's re-centred one, or Megatron's) of the counts of the
    step's ids, counted here by hand; an eval forward between steps counts nothing"""
    cfg = layer_config(score_function=score_function, bias_recentre=recentre,
                       bias_update_rate=0.05)
    torch.manual_seed(0)
    model = GPT(cfg)
    layers = model.moe_layers()
    with torch.no_grad():
        for m in layers:
            m.router.gate.weight.normal_(0, 1.0)
    seen = recorded_ids(model)
    want = [m.router.expert_bias.clone() for m in layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        for _ in range(2):
            _, loss = model(*torch.randint(0, 64, (2, 2, 16)))
            loss.backward()
        model.eval()
        model(torch.randint(0, 64, (2, 16)))
        model.train()
        opt.step()
        opt.zero_grad()
        moe.end_step(model)
        for i, m in enumerate(layers):
            ids = torch.cat(seen[i][2 * step:2 * step + 2])
            counts = torch.zeros(8)
            for e in ids.flatten().tolist():
                counts[e] += 1
            update = torchtitan_update if recentre else megatron_update
            want[i] = update(want[i], counts, 0.05)
            torch.testing.assert_close(m.router.expert_bias, want[i], rtol=0, atol=1e-6)
    assert all(len(s) == 6 for s in seen)
    means = [m.router.expert_bias.mean().abs().item() for m in layers]
    if recentre:
        assert max(means) < 1e-6
    else:  # Megatron's drifts where more experts are under the mean than over it
        assert max(means) > 1e-3


def make_layer(**kw):
    torch.manual_seed(0)
    layer = moe.MoE(layer_config(**kw), 24)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    perturbed(layer.router)
    return layer


def test_eval_forwards_do_not_count():
    """model.eval() with gradients enabled, and a training-mode forward under no_grad: nothing
    counted (torchtitan counted eval forwards before c4dff1335), so the bias does not move"""
    layer = make_layer()
    x = torch.randn(2, 8, 16, requires_grad=True)
    layer.eval()
    y, _ = layer(x)
    y.sum().backward()
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.step_counts.sum() == 0 and layer.step_tokens == 0
    bias = layer.router.expert_bias.clone()
    moe.end_step(layer)
    assert torch.equal(layer.router.expert_bias, bias)
    layer(x)[0].sum().backward()
    assert layer.step_counts.sum() == 16 * 2 and layer.step_tokens == 16


def test_activation_recomputation_counts_once():
    """torch.utils.checkpoint (use_reentrant=False) runs the layer's forward again inside the
    backward: the counts and the bias after end_step are those of the same forward without
    recomputation, and the gradients too"""
    plain, ckpt = make_layer(), make_layer()
    x = torch.randn(2, 8, 16)
    y, _ = plain(x)
    y.sum().backward()
    y2, _ = torch.utils.checkpoint.checkpoint(ckpt, x, use_reentrant=False)
    y2.sum().backward()
    assert ckpt.step_counts.sum() == 32
    assert torch.equal(ckpt.step_counts, plain.step_counts) and ckpt.step_tokens == 16
    torch.testing.assert_close(ckpt.router.gate.weight.grad, plain.router.gate.weight.grad)
    for m in (plain, ckpt):
        moe.end_step(m)
    assert torch.equal(ckpt.router.expert_bias, plain.router.expert_bias)
    assert not torch.equal(plain.router.expert_bias, perturbed(make_layer().router).expert_bias)

# -----------------------------------------------------------------------------
# quantile balancing: Megatron moe_utils.py qb_dual_update, router.py quantile_balancing and
# finalize_model_grads.py _update_router_qb_beta, transcribed (one rank, no TP / CP gather)


def qb_dual_update(scores, k, beta, update_beta=True):
    num_tokens, num_experts = scores.shape
    topk_result = (scores - beta).topk(k + 1, dim=1)
    indices = topk_result.indices[:, :-1]
    if not update_beta:
        return indices, beta
    assert (num_tokens * k) % num_experts == 0
    col_target = num_tokens * k // num_experts
    alpha = topk_result.values[:, -1:]
    beta_local = (scores - alpha).topk(col_target + 1, dim=0).values[-1].contiguous()
    return indices, beta_local


def megatron_precomputed_probs(logits, top_indices, score_function, use_pre_softmax):
    """topk_routing_with_score_function with precomputed_indices: the (T, K) probs"""
    topk = top_indices.shape[1]
    if score_function == "softmax":
        if use_pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            return torch.gather(scores, dim=1, index=top_indices)
        scores = torch.gather(logits, dim=1, index=top_indices)
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        scores = torch.nn.functional.softplus(logits.float()).sqrt()
    scores = torch.gather(scores, dim=1, index=top_indices)
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores


def update_router_qb_beta(qb_beta, accum, count, ema):
    """_update_router_qb_beta for one router on one rank (the AVG all-reduce is the identity)"""
    local_avg = accum / max(count, 1)
    new_beta = ema * qb_beta + (1.0 - ema) * local_avg
    return new_beta - new_beta.mean(dim=-1, keepdim=True)


def quantile_layer(**kw):
    torch.manual_seed(0)
    layer = moe.MoE(layer_config('quantile', **kw), 24)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    perturbed_qb(layer.router)
    return layer


def perturbed_qb(router):
    torch.manual_seed(0)
    with torch.no_grad():
        router.gate.weight.normal_(0, 1.0)
        router.qb_beta.normal_(0, 0.3)
    return router


@pytest.mark.parametrize('score_function, renorm, k', [
    ('softmax', True, 2), ('softmax', False, 2), ('softmax', True, 1), ('sigmoid', True, 2),
    ('sigmoid', True, 1), ('sqrtsoftplus', True, 3)])
def test_quantile_is_megatrons_dual_update(score_function, renorm, k):
    """ids, weights and the training forward's estimate against the transcription: Megatron's
    post-softmax is router_renorm=True, its pre-softmax router_renorm=False"""
    cfg = layer_config('quantile', k=k, qb_score_function=score_function)
    cfg.router_renorm = renorm
    router = perturbed_qb(moe.QuantileRouter(cfg))
    x = torch.randn(64, 16)
    logits = router.gate(x)
    r = router(x)
    indices, beta_local = qb_dual_update(logits.detach().float(), k, router.qb_beta)
    assert torch.equal(r.ids, indices)
    want = megatron_precomputed_probs(logits, indices, score_function, use_pre_softmax=not renorm)
    torch.testing.assert_close(r.weights, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r.step, beta_local, rtol=0, atol=0)
    # beta changes the choice: the plain top-k differs
    assert not torch.equal(r.ids, logits.topk(k, dim=-1).indices)
    # the estimate is each expert's (c+1)-th largest l - alpha, c = T k / E: at most c tokens
    # above it, at least c + 1 at or above it (ties: a token whose (k+1)-th expert is e sits at
    # beta_e exactly)
    alpha = (logits - router.qb_beta).topk(k + 1, dim=-1).values[:, -1:]
    c = 64 * k // 8
    assert ((logits - alpha) > r.step).sum(0).max() <= c
    assert ((logits - alpha) >= r.step).sum(0).min() >= c + 1
    router.eval()
    assert router(x).step is None and torch.equal(router(x).ids, indices)


@pytest.mark.parametrize('ema', [0.0, 0.9])
def test_quantile_beta_over_steps_and_micro_batches(ema):
    """three optimizer steps of two micro-batches, two MoE layers: every micro-batch routes with
    the previous step's beta, and beta after each step is _update_router_qb_beta of the step's
    accumulated qb_dual_update estimates, all by hand; eval forwards between steps add nothing"""
    cfg = layer_config('quantile', qb_ema=ema)
    cfg.aux_loss_coef = 0.0
    torch.manual_seed(0)
    model = GPT(cfg)
    layers = model.moe_layers()
    seen = [[] for _ in layers]
    for m, calls in zip(layers, seen):
        def recording(x, prev, m=m, fwd=m.router.forward, calls=calls):
            r = fwd(x, prev)
            if m.training:
                calls.append((m.router.gate(x).detach(), m.router.qb_beta.clone(), r.ids))
            return r
        m.router.forward = recording
    beta = [torch.zeros(8) for _ in layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        for _ in range(2):
            _, loss = model(*torch.randint(0, 64, (2, 2, 16)))
            loss.backward()
        model.eval()
        model(torch.randint(0, 64, (2, 16)))
        model.train()
        opt.step()
        opt.zero_grad()
        moe.end_step(model)
        for i, m in enumerate(layers):
            accum, count = torch.zeros(8), 0
            for logits, used, ids in seen[i][2 * step:2 * step + 2]:
                torch.testing.assert_close(used, beta[i], rtol=0, atol=1e-7)
                indices, beta_local = qb_dual_update(logits, 2, beta[i])
                assert torch.equal(ids, indices)
                accum, count = accum + beta_local, count + 1
            beta[i] = update_router_qb_beta(beta[i], accum, count, ema)
            torch.testing.assert_close(m.router.qb_beta, beta[i], rtol=0, atol=1e-6)
            assert m.router.qb_beta.abs().max() > 0 and m.router.qb_beta.mean().abs() < 1e-6
    assert all(len(s) == 6 for s in seen)


def test_quantile_counts_once_under_recomputation():
    plain, ckpt = quantile_layer(), quantile_layer()
    x = torch.randn(2, 8, 16)
    plain(x)[0].sum().backward()
    torch.utils.checkpoint.checkpoint(ckpt, x, use_reentrant=False)[0].sum().backward()
    assert ckpt.step_forwards == plain.step_forwards == 1
    assert torch.equal(ckpt.step_sums, plain.step_sums) and plain.step_sums.abs().sum() > 0
    plain.eval()
    plain(x)
    assert plain.step_forwards == 1


def test_quantile_bad_sizes_are_one_clear_error():
    with pytest.raises(ValueError, match='n_experts=2 must be at least top_k \\+ 1 = 3'):
        moe.QuantileRouter(layer_config('quantile', E=2, k=2))
    with pytest.raises(ValueError, match='qb_score_function'):
        moe.QuantileRouter(layer_config('quantile', qb_score_function='relu'))
    router = moe.QuantileRouter(layer_config('quantile', k=1))
    with pytest.raises(ValueError, match='T \\* top_k = 7 \\* 1'):
        router(torch.randn(7, 16))
    router.eval()
    assert router(torch.randn(7, 16)).ids.shape == (7, 1)  # eval updates nothing: any T


def test_quantile_resumes_and_trains_at_ep2_as_one_process(trainer):
    """configs/quantile.py: resumed as the uninterrupted run (beta in the checkpoint), and at
    ep_size=2 over 2 processes (each rank one micro-batch, the estimates averaged over the ranks)
    as one process with both micro-batches"""
    full, half = resumed_equals_full(trainer, 'quantile')
    two = trainer.run(config_args('quantile', '--ep_size=2', '--max_iters=5'), nproc=2).check()
    assert_same_losses(two, full, range(1, 6), rel=1e-5)
    a, b = (torch.load(r.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)['model']
            for r in (half, two))
    name = 'transformer.h.0.mlp.router.qb_beta'
    torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    assert a[name].abs().max() > 0

# -----------------------------------------------------------------------------
# latent experts: Megatron moe_layer.py (fc1_latent_proj, fc2_latent_proj) and experts.py


def latent_layer(**kw):
    cfg = GPTConfig(n_embd=16, n_head=4, router='softmax', n_experts=8, top_k=2, bias=True,
                    moe_latent_size=4, n_shared_experts=1, **kw)
    torch.manual_seed(0)
    layer = moe.MoE(cfg, 24)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def test_latent_layer_is_megatrons_data_flow():
    """Megatron MoELayer.forward with moe_latent_size, by hand per token: the shared expert and the
    router on the full hidden state; fc1_latent_proj of every token before dispatch; each routed
    expert latent -> ffn -> latent; the probability-weighted sum in latent space; fc2_latent_proj;
    then + the shared expert's output. Weight shapes as test_latent_moe_layer.py."""
    layer = latent_layer(arch='llama')
    assert layer.fc1_latent.weight.shape == (4, 16) and layer.fc2_latent.weight.shape == (16, 4)
    assert layer.experts.c_fc.shape == (8, 48, 4) and layer.experts.c_proj.shape == (8, 4, 24)
    assert layer.shared.c_fc.shape == (1, 48, 16) and layer.router.gate.weight.shape == (8, 16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, _ = layer(x)
    e = layer.experts
    for t, h in enumerate(x.detach().view(-1, 16)):
        p = (layer.router.gate.weight @ h).softmax(-1)
        w, ids = p.topk(2)
        w = w / w.sum()
        latent = layer.fc1_latent.weight @ h + layer.fc1_latent.bias
        combined = torch.zeros(4)
        for j in range(2):
            gate, up = (e.c_fc[ids[j]] @ latent + e.b_fc[ids[j]]).chunk(2)
            combined += w[j] * (e.c_proj[ids[j]] @ (F.silu(gate) * up) + e.b_proj[ids[j]])
        out = layer.fc2_latent.weight @ combined + layer.fc2_latent.bias
        gate, up = (layer.shared.c_fc[0] @ h + layer.shared.b_fc[0]).chunk(2)
        out = out + layer.shared.c_proj[0] @ (F.silu(gate) * up) + layer.shared.b_proj[0]
        torch.testing.assert_close(y.view(-1, 16)[t], out, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.fc1_latent.weight.grad.abs().sum() > 0
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_latent_active_parameters_and_mfu():
    """num_params by hand: the projections are always active, each routed expert is latent-sized;
    estimate_mfu's 6 N counts them (PaLM appendix B)"""
    cfg = GPTConfig(n_embd=32, n_head=4, n_layer=2, block_size=16, vocab_size=64, router='softmax',
                    n_experts=8, top_k=2, moe_latent_size=8, bias=True)
    model = GPT(cfg)
    total, active = model.num_params()
    assert total == sum(p.numel() for p in model.parameters())
    # one latent expert: c_fc (128, 8) + b_fc 128 + c_proj (8, 128) + b_proj 8
    per_expert = 128 * 8 + 128 + 8 * 128 + 8
    assert active == total - 2 * 6 * per_expert
    projections = 2 * (32 * 8 + 8 + 8 * 32 + 32)
    dense = GPT(GPTConfig(n_embd=32, n_head=4, n_layer=2, block_size=16, vocab_size=64,
                          router='softmax', n_experts=8, top_k=2, bias=True))
    full_expert = 128 * 32 + 128 + 32 * 128 + 32
    assert dense.num_params()[1] - active == 2 * 2 * (full_expert - per_expert) - projections
    n = active - model.transformer.wpe.weight.numel()
    want = (6 * n + 12 * 2 * 4 * 8 * 16) * 16 * 4 / 2.0 / 1e12
    assert model.estimate_mfu(4, 16, 2.0, 1e12) == pytest.approx(want, rel=1e-12)


def test_latent_config_goes_after_a_router_or_alone():
    """configs/latent.py after configs/sigmoid.py keeps sigmoid's routing; alone it brings
    softmax top-2 with a shared expert; the latent width is n_embd / 4 either way"""
    from cli import parse, settings_of
    from conftest import REPO
    train = settings_of(REPO / 'train.py')
    after, _ = parse(train, ['--n_embd=64', config('sigmoid'), config('latent')])
    alone, _ = parse(train, [config('latent')])
    assert after['router'] == 'sigmoid' and after['n_shared_experts'] == 0
    assert after['moe_latent_size'] == 16
    assert (alone['router'], alone['top_k'], alone['n_shared_experts']) == ('softmax', 2, 1)
    assert alone['moe_latent_size'] == alone['n_embd'] // 4


def test_latent_resumes_and_trains_at_ep2_as_one_process(trainer):
    """configs/latent.py: resumed as the uninterrupted run, and at ep_size=2 (the exchange moves
    latent rows) as one process"""
    full, _ = resumed_equals_full(trainer, 'latent')
    two = trainer.run(config_args('latent', '--ep_size=2', '--max_iters=5'), nproc=2).check()
    assert_same_losses(two, full, range(1, 6), rel=1e-5)
    ckpt = torch.load(two.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['model']['transformer.h.0.mlp.experts.c_fc'].shape == (8, 128, 8)
    assert ckpt['model']['transformer.h.0.mlp.fc1_latent.weight'].shape == (8, 32)

# -----------------------------------------------------------------------------
# routing trace and replay: Megatron router_replay.py (RECORD, REPLAY_FORWARD) and router_trace.py


def megatron_replay_topk(scores, target_topk_idx):
    """RouterReplay.get_replay_topk in REPLAY_FORWARD: the router's scores at the target indices"""
    return scores.gather(1, target_topk_idx), target_topk_idx


def small_gpt(router, seed):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_embd=32, n_head=4, n_layer=2, block_size=16, vocab_size=64, router=router,
                    n_experts=8, top_k=2)
    model = GPT(cfg)
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.gate.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize('router', ['softmax', 'sigmoid'])
def test_replay_takes_the_recorded_ids_and_the_current_routers_weights(router):
    """a softmax model's routing recorded over two forwards, replayed in another model (another
    seed, the router below): its ids are the recorded ones, its weights the current router's
    scores at them renormalised (Megatron's REPLAY_FORWARD, then its top-k's normalisation), its
    router gets gradients through them, and its load counts the replayed ids"""
    a, b = small_gpt('softmax', 0), small_gpt(router, 1)
    xs = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    trace = [[] for _ in a.moe_layers()]
    with moe.routing(a, trace=trace, scores=True):
        for x in xs:
            a(x)
    assert [len(t) for t in trace] == [2, 2]
    assert set(trace[0][0]) == {'ids', 'weights', 'scores', 'logits'}
    assert trace[0][0]['ids'].shape == (32, 2)
    # softmax's probabilities are its logits' softmax
    torch.testing.assert_close(trace[0][0]['scores'], trace[0][0]['logits'].softmax(-1))
    seen = [[] for _ in b.moe_layers()]
    for m, kept in zip(b.moe_layers(), seen):
        def recording(x, prev, fwd=m.router.forward, kept=kept):
            r = fwd(x, prev)
            kept.append(r)
            return r
        m.router.forward = recording
    replayed = [[] for _ in b.moe_layers()]
    with moe.routing(b, trace=replayed, replay=trace):
        for x in xs:
            _, loss = b(x, x)
            loss.backward()
    for j in range(2):
        for i in range(2):
            ids = trace[j][i]['ids']
            assert torch.equal(replayed[j][i]['ids'], ids)
            # the router's own choice differs: replay is what made these ids
            assert not torch.equal(seen[j][i].ids, ids)
            probs = seen[j][i].probs.detach()
            w, _ = megatron_replay_topk(probs, ids)
            torch.testing.assert_close(replayed[j][i]['weights'], w / w.sum(-1, keepdim=True))
        load = torch.bincount(torch.cat([t['ids'] for t in trace[j]]).flatten(), minlength=8)
        assert b.moe_layers()[j].load.tolist() == load.tolist()
    assert all(m.router.gate.weight.grad.abs().sum() > 0 for m in b.moe_layers())


def test_replay_mismatches_are_clear_errors():
    a = small_gpt('softmax', 0)
    with pytest.raises(ValueError, match='the replay has 1 MoE layers, the model 2'):
        with moe.routing(a, replay=[[]]):
            pass
    trace = [[] for _ in a.moe_layers()]
    x = torch.randint(0, 64, (2, 16))
    with moe.routing(a, trace=trace):
        a(x)
    with moe.routing(a, replay=trace):
        a(x)
        with pytest.raises(ValueError, match='holds 1 forwards of MoE layer 0'):
            a(x)
    # restored on exit: the router routes again
    assert a.moe_layers()[0]._replay is None and a.moe_layers()[0]._trace is None


def test_trace_file_round_trip(tmp_path):
    a = small_gpt('quantile', 0)
    trace = [[] for _ in a.moe_layers()]
    with moe.routing(a, trace=trace):
        a(torch.randint(0, 64, (2, 16)))
    moe.save_trace(tmp_path / 't.pt', trace)
    back = moe.load_trace(tmp_path / 't.pt')
    assert all(torch.equal(x['ids'], y['ids']) and torch.equal(x['weights'], y['weights'])
               for t, u in zip(trace, back) for x, y in zip(t, u))


def test_train_traces_and_replays(trainer):
    """train.py: routing_trace=10 writes every training forward's routing (10 steps x 2
    micro-batches per layer); a run replaying it with the same settings traces the same ids and has
    the same losses; a sigmoid run replaying the softmax trace routes on those ids too. At 2
    processes each rank's trace holds its own micro-batches: rank r's forward i is one process's
    forward 2 i + r"""
    one = trainer.run(config_args('softmax', '--routing_trace=10')).check()
    trace = moe.load_trace(one.out_dir / 'routing_trace_rank0.pt')
    assert [len(t) for t in trace] == [20, 20] and trace[0][0]['ids'].shape == (128, 2)
    again = trainer.run(config_args('softmax', '--routing_trace=10',
                                    f'--routing_replay={one.out_dir}')).check()
    assert_same_losses(again, one, range(1, 11))
    # another seed: other weights, other batches; the ids are the trace's all the same
    other = trainer.run(config_args('sigmoid', '--routing_trace=10', '--max_iters=5', '--seed=7',
                                    f'--routing_replay={one.out_dir}')).check()
    free = trainer.run(config_args('sigmoid', '--routing_trace=1', '--seed=7')).check()
    free = moe.load_trace(free.out_dir / 'routing_trace_rank0.pt')
    assert not torch.equal(free[0][0]['ids'], trace[0][0]['ids'])
    for name, run, n in (('again', again, 20), ('sigmoid', other, 10)):
        got = moe.load_trace(run.out_dir / 'routing_trace_rank0.pt')
        assert all(torch.equal(g['ids'], w['ids']) for t, u in zip(got, trace)
                   for g, w in zip(t[:n], u[:n])), name
        assert [len(t) for t in got] == [n, n]
    two = trainer.run(config_args('softmax', '--routing_trace=3', '--ep_size=2'), nproc=2).check()
    for r in range(2):
        mine = moe.load_trace(two.out_dir / f'routing_trace_rank{r}.pt')
        assert [len(t) for t in mine] == [3, 3]
        assert all(torch.equal(mine[j][i]['ids'], trace[j][2 * i + r]['ids'])
                   for j in range(2) for i in range(3))
    bad = trainer.run(config_args('softmax', f'--routing_replay={two.out_dir}/none'), cache=False)
    assert bad.rc != 0 and 'routing_replay=' in bad.out and 'Traceback' not in bad.out


# the methods as eval.py's analysis sees them: each router's own choice on its layer's input
ANALYSED = {
    'quantile': (dict(router='quantile', router_options=dict(qb_score_function='sqrtsoftplus')),
                 lambda r, x: (r.gate(x) - r.qb_beta).topk(2, dim=-1).indices),
    'sqrtsoftplus': (dict(router='deepseek', router_options=dict(score_function='sqrtsoftplus')),
                     lambda r, x: (F.softplus(r.gate(x)).sqrt() + r.expert_bias).topk(2).indices),
    'latent': (dict(router='softmax', moe_latent_size=8, n_shared_experts=1, arch='llama',
                    bias=False), lambda r, x: r.gate(x).softmax(-1).topk(2, dim=-1).indices)}


@pytest.mark.parametrize('name', list(ANALYSED))
def test_eval_analysis_reads_each_method(name, tmp_path):
    """eval.py's analysis records, for every MoE layer, the ids the router chose (top-k of
    l - beta, of sqrt(softplus(l)) + b, of the router's softmax on the full hidden state: by hand
    from each layer's input, with beta and the bias moved off 0); Drop-Top-1 keeps the others;
    eval.py --analyze writes both for a task of a saved run"""
    import json
    import eval as ev
    from conftest import TASKS
    from test_export import save_run, tiny
    kw, by_hand = ANALYSED[name]
    model = tiny(n_experts=4, top_k=2, **kw)
    with torch.no_grad():
        for b_name, b in model.named_buffers():
            if b_name.endswith(('qb_beta', 'expert_bias')):
                b.copy_(3 * torch.randn(b.shape, generator=torch.Generator().manual_seed(3)))
    inputs = [[] for _ in model.moe_layers()]
    for m, kept in zip(model.moe_layers(), inputs):
        m.router.register_forward_pre_hook(lambda mod, args, kept=kept: kept.append(args[0]))
    lm = ev.MoELM(model, (None, None, model.config.vocab_size, 0))
    rows = [list(range(100, 140)), list(range(300, 340))]
    moved = []  # whether beta or the bias changed some choice of a layer
    for drop in (False, True):
        with moe.analysis(model, drop_top1=drop, record=True) as records:
            lm.records, lm.task = records, f'drop{drop}'
            lm.logits(rows, [(39, 40), (39, 40)])
        for j, r in enumerate(model.moe_layers()):
            ids, _ = lm.routing[f'drop{drop}'][j][0]
            with torch.no_grad():
                want = by_hand(r.router, inputs[j][-1])
                moved.append(not torch.equal(want, r.router.gate(inputs[j][-1]).topk(2).indices))
            assert torch.equal(ids, want[:, 1:] if drop else want), (name, drop, j)
    assert any(moved) == (name != 'latent')
    run = save_run(tmp_path / 'run', model)
    ev.main([str(run), '--tasks', 'piqa', '--data_dir', str(TASKS), '--limit', '3',
             '--batch_size', '4', '--analyze', '--routing_trace', '--device', 'cpu'])
    out = json.loads((run / 'eval.json').read_text())
    assert len(out['routing']['piqa']) == 2 and 'piqa' in out['drop_top1']
    # eval.py's own trace: every scoring forward's ids, two per token; the analysis counts the
    # scored tokens of the same forwards, the trace every token (the batches' padding too)
    trace = moe.load_trace(run / 'routing_trace_eval.pt')
    assert len(trace) == 2 and trace[0]
    for j, layer in enumerate(trace):
        counts = sum(torch.bincount(rec['ids'].flatten(), minlength=4) for rec in layer)
        assert counts.sum() == 2 * sum(rec['ids'].shape[0] for rec in layer)
        load = torch.tensor(out['routing']['piqa'][j]['load'])
        assert (counts >= load).all() and ((counts > 0) == (load > 0)).all(), (j, counts, load)


def test_sample_traces_and_eval_reads_the_trace(tmp_path, capsys):
    """sample.py --routing_trace writes one record per forward and MoE layer (the prompt, then one
    per new token with the key/value cache); eval.py's analysis reads the run folder's traces: the
    load per expert of each layer is the traced ids' count, by hand"""
    import eval as ev
    import sample
    from test_export import save_run, tiny
    model = tiny(router='quantile', n_experts=4, top_k=2)
    run = save_run(tmp_path / 'run', model)
    sample.main([f'--out_dir={run}', '--start=Hello there, world', '--num_samples=2',
                 '--max_new_tokens=3', '--routing_trace=True', '--device=cpu'])
    trace = moe.load_trace(run / 'routing_trace_sample.pt')
    assert [len(t) for t in trace] == [6, 6]
    prompt = trace[0][0]['ids'].shape[0]
    assert prompt > 1 and [r['ids'].shape for r in trace[0][1:3]] == [(1, 2), (1, 2)]
    routing = ev.traced_routing(run, 4)
    assert set(routing) == {'trace:routing_trace_sample'}
    for j, layer in enumerate(routing['trace:routing_trace_sample']):
        counts = [0] * 4
        for r in trace[j]:
            for e in r['ids'].flatten().tolist():
                counts[e] += 1
        assert layer['load'] == counts and sum(counts) == 2 * (2 * prompt + 4)
        assert layer['dropped'] is None
