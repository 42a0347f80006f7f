"""
The Mixture-of-Experts layer: the routing contract, every router, the aux losses, the experts,
sort-based dispatch, expert parallelism and routing statistics. One file, so a router is read (and
added) next to everything it plugs into. Each router's formula, source and departures from it:
docs/routers.md.

Decisions, each with where its evidence lives:
- A router returns a Routing: ids and weights (T, K). A router with a variable number of experts per
  token (remoe, topp, expert_choice) fills the slots a token does not use with UNUSED (-1) and
  weight 0; ids >= E are cheap experts with no FFN. Dispatch, capacity, EP, the losses, the
  statistics and Drop-Top-1 read this form only (tests/test_routing_methods.py).
- Router hooks are no-op methods of Router (cheap_output, after_step) that a router overrides where
  it uses them: the layer and end_step never ask which router they hold (tests/test_add_router.py).
- What after_step learns from (moe.Step: counts, tokens, Routing.step's sums) is taken in training
  forwards with gradients outside a backward: never in eval, once per micro-batch under
  torch.utils.checkpoint's recomputation (tests/test_routing_2026.py; docs/routers.md).
- Router math runs in float32 outside autocast, so the choice of experts does not depend on the
  training dtype (tests/test_moe.py: bf16 against fp32).
- Aux losses are computed here from what any router returns and are returned, never stored: balance
  (Switch / Megatron normalisation, perfect balance = 1) and z-loss (ST-MoE), see docs/routers.md.
- Dispatch is sort-based and dropless: the T*K slots flattened slot-major, stable-sorted by expert
  id, one gather, each expert on its contiguous rows, index_add_ back; no (T, E, capacity) one-hot.
  Slot-major order seats every first choice before any second one under a capacity factor, as
  GShard.
- The combine weight multiplies each row's hidden activation, not its output: the hidden width is <=
  d in fine-grained experts, the cheapest place (docs/performance.md).
- Experts are stacked (E, out, in) tensors, transformers 5's layout, run as one F.grouped_mm per
  matrix where torch 2.13 has a fused kernel for it (bf16 on compute capability 9.x and 10.x), else
  one F.linear per expert: everywhere else torch's grouped_mm is itself a loop of matmuls after a
  host sync (GroupedBlas.cpp; docs/performance.md). tests/test_moe.py checks both against a naive
  loop; gpu_check.py on a GPU.
- Expert parallelism by hand: counts, then tokens with all_to_all_single inside an autograd Function
  whose backward swaps the splits (Megatron's _AllToAll); tests/ep_worker.py checks it against one
  process.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# -----------------------------------------------------------------------------
# routers

# the id of an unused slot (weight 0): a token that takes fewer than K experts
UNUSED = -1


@dataclass
class Routing:
    """The contract between a router and the layer. K slots per token: K = top_k for a top-k router,
    the router's most experts per token for the others (remoe, topp, expert_choice). Slot 0 is the
    token's first choice, the others follow by weight; a slot a token does not use holds UNUSED (-1)
    with weight 0, after its used slots. Ids >= E are cheap experts (no FFN). n = the number of
    experts the balance loss sees."""
    # (T, K) expert ids; ids >= E are cheap experts (no FFN); UNUSED (-1) = no expert
    ids: torch.Tensor
    # (T, K) combine weights (signed for tcmoe; 0 in UNUSED slots)
    weights: torch.Tensor
    # (T, n) probabilities for the balance loss
    probs: torch.Tensor
    # (T, n) logits for the z-loss; None where the router's source has no z-loss
    logits: torch.Tensor | None
    # the router's own loss, already weighted (tcmoe's null reward, remoe's L1, topp's dynamic loss)
    loss: torch.Tensor | float = 0.0
    # (n,) factor of each expert's term in the balance loss (MoE++'s tau)
    balance_weight: torch.Tensor | None = None
    # (T, k) the ids the balance loss counts, where they are not ids (deepseek: top-k, no bias)
    balance_ids: torch.Tensor | None = None
    # handed to the next MoE layer's router as `prev` (MoE++'s gating residual)
    state: torch.Tensor | None = None
    # every slot holds an FFN expert (0 <= id < E): the layer then knows the T*K assignments
    # without a host sync; False where a slot may be UNUSED or a cheap expert (the count is read)
    all_ffn: bool = True
    # (m,) this forward's statistic for the router's after_step (quantile's beta estimate), summed
    # over the step's counted forwards and every rank; m = Router.step_width, None where 0
    step: torch.Tensor | None = None


@dataclass
class Step:
    """what after_step gets: the optimizer step's counted forwards (training, with gradients, not
    recomputed) of one router class's layers, summed over every rank; one row per layer"""
    # (L, E) FFN assignments per expert
    counts: torch.Tensor
    # (L,) tokens
    tokens: torch.Tensor
    # (L,) forwards (micro-batches times ranks)
    forwards: torch.Tensor
    # (L, m) the sums of Routing.step (m = Router.step_width; 0 columns where a router has none)
    sums: torch.Tensor


def renorm(w):
    return w / (w.sum(-1, keepdim=True) + 1e-20)


def sqrtsoftplus(logits):
    """DeepSeek-V4's score sqrt(softplus(l)) (Megatron topk_routing_with_score_function, float32):
    softplus is exact where a naive log(1 + e^l) is 0 (l <= -16.6 in float32); softplus is floored
    at float32's smallest normal (l < -87) so that sqrt's gradient stays finite where it
    underflows"""
    return F.softplus(logits).clamp_min(torch.finfo(torch.float32).tiny).sqrt()


# a router's score function of its logits (T, E), float32 (Megatron moe_router_score_function)
SCORES = {'softmax': lambda logits: logits.softmax(-1), 'sigmoid': torch.sigmoid,
          'sqrtsoftplus': sqrtsoftplus}


class Router(nn.Module):
    """Base class. A router maps x (T, d) float32, and prev (the previous MoE layer's Routing.state,
    None in the first MoE layer), to a Routing. Its settings are class attributes that become config
    keys. Its hooks are the no-op methods below; a router overrides the ones it uses."""
    # architecture settings and their defaults (fixed by a checkpoint)
    options = {}
    # training knobs and their defaults (a run from a checkpoint may change them)
    knobs = {}
    # the allowed values of each numeric or text option and knob (cli.problem: '>= 0', choices)
    limits = {}

    @classmethod
    def settings(cls):
        return {**cls.options, **cls.knobs}

    @classmethod
    def learns_after_step(cls):
        """whether it overrides after_step: moe.end_step all-reduces the step's counts only for
        such routers' layers"""
        return cls.after_step.__func__ is not Router.after_step.__func__

    def __init__(self, config):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.renorm = config.router_renorm
        # fraction of training done, set by moe.set_progress (hyper's k schedule reads it)
        self.progress = 1.0
        # the length of the Routing.step this router returns (0: none)
        self.step_width = 0

    def select(self, p):
        """top-k of p (T, n) -> weights, ids (T, k), renormalised if configured"""
        w, ids = p.topk(self.top_k, dim=-1)
        return (renorm(w) if self.renorm else w), ids

    def cheap_output(self, x, ids, w):
        """the output (T, d) of the cheap experts (ids >= E) for x (T, d), ids and weights w (T, K);
        None: this router has none"""
        return None

    def replay_weights(self, r, ids):
        """the weights (T, K) of replayed ids (T, K) (moe.routing) from this forward's Routing r:
        its probabilities at the ids, renormalised where router_renorm, 0 in UNUSED slots; through
        r.probs the router still gets gradients (Megatron router_replay.py: the router's scores
        gathered at the target indices, then its top-k's normalisation). The router's own weights
        for softmax, sigmoid, deepseek and quantile with router_renorm; docs/routers.md"""
        w = r.probs.gather(1, ids.clamp(0, r.probs.shape[1] - 1)) * (ids >= 0)
        return renorm(w) if self.renorm else w

    @classmethod
    def after_step(cls, routers, step):
        """after each optimizer step, for a router that overrides it: routers, the routers of this
        class in the model, one per layer; step, a Step: each layer's FFN assignments per expert,
        tokens, forwards and sums of Routing.step over the step's training forwards and every
        rank"""


class SoftmaxRouter(Router):
    """p = softmax(Wx), top-k, renorm (router_renorm=False: OLMoE / Qwen2-MoE); z-loss on Wx.
    Source: Shazeer et al. 2017; checked against HF Mixtral and OLMoE blocks. No departures."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        p = logits.softmax(-1)
        w, ids = self.select(p)
        return Routing(ids=ids, weights=w, probs=p, logits=logits)


class SwitchRouter(Router):
    """Switch Transformer (Fedus et al. 2021): k = 1, p = softmax(W(x * U(1 - eps, 1 + eps))), the
    input jitter in training only, weight = max p. No z-loss: the Switch Transformer had none (it
    came with ST-MoE)."""
    # multiplicative input jitter during training
    knobs = dict(router_jitter=0.01)
    limits = dict(router_jitter='[0, 1)')

    def __init__(self, config):
        super().__init__(config)
        if config.top_k != 1:
            raise ValueError(f"router 'switch' routes each token to one expert: set top_k=1 "
                             f"(got {config.top_k})")
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.jitter = config.router_options['router_jitter']

    def forward(self, x, prev=None):
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = self.gate(x)
        p = logits.softmax(-1)
        w, ids = p.max(-1, keepdim=True)  # (T, 1)
        return Routing(ids=ids, weights=w, probs=p, logits=None)


class SigmoidRouter(Router):
    """s = sigmoid(Wx), top-k, renorm; balance probabilities s / sum(s); z-loss on Wx.
    Source: LibMoE smoe_sigmoidgating.py, moe_layer.py (sigma-MoE, Csordas et al. 2023). No
    departures."""

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)

    def forward(self, x, prev=None):
        logits = self.gate(x)
        s = logits.sigmoid()
        w, ids = self.select(s)
        return Routing(ids=ids, weights=w, probs=s / s.sum(-1, keepdim=True), logits=logits)


class CosineRouter(Router):
    """cosine_variant 'xmoe' (LibMoE v2 xmoe.py): r = Px in router_dim dims, expert embeddings M at
    norm 1.5, l = <r/|r|, M_e>, p = softmax(l / tau), top-k of p, weights = softmax of the k values.
    'libmoe' (LibMoE v1.1 moe_cosinegating.py, Cosine-R): l = cos(x, W_e) in full dimension,
    p = softmax(l), top-k of p + b (the gate's bias), weights = softmax of those k values.
    Departures: no z-loss (LibMoE has one on the bounded cosines), no _make_finite, router_dim >= 2.
    X-MoE's own release (torchscale) differs more: docs/routers.md."""
    # 'xmoe' (projected, tau, M at norm 1.5) or 'libmoe' (LibMoE v1.1 Cosine-R / PertCos-R);
    # xmoe: the routing space (0 = E/2, as LibMoE) and the temperature tau
    options = dict(cosine_variant='xmoe', router_dim=0, router_temperature=0.3)
    limits = dict(cosine_variant=('xmoe', 'libmoe'), router_dim='>= 0', router_temperature='> 0')

    def __init__(self, config):
        super().__init__(config)
        o, d, E = config.router_options, config.n_embd, config.n_experts
        self.variant = o['cosine_variant']
        if self.variant not in ('xmoe', 'libmoe'):
            raise ValueError(f"cosine_variant={self.variant!r}: use 'xmoe' or 'libmoe'")
        if self.variant == 'xmoe':
            dim = o['router_dim'] or max(E // 2, 2)
            self.tau = o['router_temperature']
            # P: d -> router_dim
            self.gate = nn.Linear(d, dim, bias=False)
            # M, held at norm 1.5: rescaled here and after each optimizer step (after_step)
            self.expert_emb = nn.Parameter(torch.randn(E, dim))
            with torch.no_grad():
                self.expert_emb.mul_(1.5 / self.expert_emb.norm(dim=-1, keepdim=True))
        else:
            # rows W_e; the bias is added to the probabilities
            self.gate = nn.Linear(d, E, bias=True)

    def scores(self, a, b):
        """(T, n) x (E, n) -> (T, E); xmoe: b's rows are held at norm 1.5 and only a is
        normalised"""
        if self.variant == 'xmoe':
            return F.normalize(a, dim=-1, eps=1e-4) @ b.t()
        return (a @ b.t()) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1))

    def forward(self, x, prev=None):
        if self.variant == 'xmoe':
            # X-MoE sets M back to norm 1.5 in place, outside autograd, before each forward; here
            # after each optimizer step (the only change between forwards), so that no forward
            # writes a parameter (FSDP gathers a copy for it). The forward takes M at norm 1.5 by
            # a detached scale, which is 1 in training
            M = self.expert_emb * (1.5 / self.expert_emb.norm(dim=-1, keepdim=True)).detach()
            logits = self.scores(self.gate(x), M)  # (T, E)
            p = (logits / self.tau).softmax(-1)
            v, ids = p.topk(self.top_k, dim=-1)
        else:
            logits = self.scores(x, self.gate.weight)  # (T, E)
            p = logits.softmax(-1)
            # the bias shifts the probabilities
            v, ids = (p + self.gate.bias).topk(self.top_k, dim=-1)
        # a softmax over the k selected values
        return Routing(ids=ids, weights=v.softmax(-1), probs=p, logits=None)

    @classmethod
    @torch.no_grad()
    def after_step(cls, routers, step):
        for router in routers:
            if router.variant == 'xmoe':
                # rows whole on every rank (an FSDP shard holds whole rows)
                M = router.expert_emb
                M = M.to_local() if isinstance(M, DTensor) else M
                M.mul_(1.5 / M.norm(dim=-1, keepdim=True))


class PerturbedCosineRouter(CosineRouter):
    """LibMoE v1.1 moe_perturbed.py (PertCos-R): the cosine's norms each get + theta,
    l = <a, b> / ((|a| + theta)(|b| + theta)). 'libmoe' is PertCos-R exactly; 'xmoe' puts this score
    into the xmoe variant (a = Px, b = M at norm 1.5), a combination neither source has. No
    z-loss."""
    # theta, added to both norms
    options = dict(CosineRouter.options, cosine_theta=0.1)
    limits = dict(CosineRouter.limits, cosine_theta='>= 0')

    def __init__(self, config):
        super().__init__(config)
        self.theta = config.router_options['cosine_theta']

    def scores(self, a, b):
        a_norm = a.norm(dim=-1, keepdim=True) + self.theta
        return (a @ b.t()) / (a_norm * (b.norm(dim=-1) + self.theta))


class HyperRouter(Router):
    """HyperRouter (Do et al. 2023; custom_gate.py, new_utils.py) as LibMoE v1.1 hyperrouter.py:
    [W | b] = frozen_hypernet(e), e trainable; top-k of Wx + b, softmax over the k; k grows from
    hyper_k_min to top_k over training (Python's round, as both sources). Departure: the weights are
    generated at every forward (LibMoE swaps them in at training forwards only: the same function of
    e). No aux loss."""
    # k grows from hyper_k_min to top_k over training, as HyperRouter / LibMoE;
    # the schedule's first k (1 as LibMoE; >= 2 gives the router a gradient from the start)
    knobs = dict(hyper_k_schedule=True, hyper_k_min=1)
    limits = dict(hyper_k_min='>= 1')

    def __init__(self, config):
        super().__init__(config)
        d, E = config.n_embd, config.n_experts
        # the trainable embedding e
        self.embedding = nn.Parameter(torch.randn(d))
        h = d // 4
        self.hypernet = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, E * (d + 1)))
        # a frozen random hypernetwork
        self.hypernet.requires_grad_(False)
        self.k_schedule = config.router_options['hyper_k_schedule']
        self.k_min = config.router_options['hyper_k_min']
        if self.k_schedule and not 1 <= self.k_min <= self.top_k:
            raise ValueError(f"hyper_k_min={self.k_min} must be between 1 and top_k={self.top_k}")

    def current_k(self):
        """HyperRouter's linear_increase / LibMoE's set_num_current_selected:
        round((k - k_min) * step / total) + k_min, Python's round (half to even): with k_min = 1,
        top_k = 2, k = 1 until past half of training"""
        if not (self.training and self.k_schedule):
            return self.top_k
        return round((self.top_k - self.k_min) * self.progress) + self.k_min

    def forward(self, x, prev=None):
        E, d = self.n_experts, x.shape[-1]
        # router weight and bias, made from e
        wb = self.hypernet(self.embedding).view(E, d + 1)
        logits = F.linear(x, wb[:, :d], wb[:, d])  # (T, E)
        top, ids = logits.topk(self.current_k(), dim=-1)
        return Routing(ids=ids, weights=top.softmax(-1), probs=logits.softmax(-1), logits=None)


class DeepSeekRouter(Router):
    """DeepSeek-V3 (HF DeepseekV3MoE; model.py Gate): s = sigmoid(Wx), ids = top-k of s + b,
    group-limited, weights = renorm(s[ids]); after each optimizer step b += u sign(mean(c) - c), c
    the step's assignments per expert over every rank. The balance loss counts the plain top-k of s
    (the paper's f; Megatron's compute_routing_scores_for_aux_loss), not the biased ids. No z-loss
    (V3 has none). score_function='sqrtsoftplus': DeepSeek-V4's s = sqrt(softplus(Wx)) (Megatron
    moe_utils.py topk_routing_with_score_function), renormalised only when top_k > 1 as there.
    bias_recentre: the step's increment re-centred to mean 0 (torchtitan optimizer.py
    _update_expert_bias). Departures: docs/routers.md."""
    # group-limited top-k; the score function: 'sigmoid' (V3) or 'sqrtsoftplus' (V4)
    options = dict(n_group=1, topk_group=1, score_function='sigmoid')
    # the bias step u; the step's increment minus its mean (torchtitan)
    knobs = dict(bias_update_rate=1e-3, bias_recentre=False)
    limits = dict(n_group='>= 1', topk_group='>= 1', bias_update_rate='>= 0',
                  score_function=('sigmoid', 'sqrtsoftplus'))

    def __init__(self, config):
        super().__init__(config)
        o, E = config.router_options, config.n_experts
        self.n_group, self.topk_group = o['n_group'], o['topk_group']
        self.rate, self.recentre = o['bias_update_rate'], o['bias_recentre']
        self.score_function = o['score_function']
        if self.score_function not in ('sigmoid', 'sqrtsoftplus'):
            raise ValueError(f"deepseek: score_function={self.score_function!r}: "
                             f"use 'sigmoid' or 'sqrtsoftplus'")
        G, g = self.n_group, self.topk_group
        if E % G or g > G or g * E // G < self.top_k:
            raise ValueError(f"deepseek: n_group={G} must divide n_experts={E} and its top "
                             f"topk_group={g} groups must hold at least top_k={self.top_k} experts")
        self.gate = nn.Linear(config.n_embd, E, bias=False)
        # b: steers selection only, no gradient
        self.register_buffer('expert_bias', torch.zeros(E))

    def forward(self, x, prev=None):
        logits = self.gate(x)
        s = SCORES[self.score_function](logits)  # (T, E)
        choice = s + self.expert_bias
        if self.n_group > 1:
            T, G = choice.shape[0], self.n_group
            grouped = choice.view(T, G, -1)  # (T, G, E/G)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (T, G)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float('-inf')).view(T, -1)
        ids = choice.topk(self.top_k, dim=-1).indices  # (T, k)
        w = s.gather(1, ids)
        # HF DeepseekV3's norm_topk_prob at any k; Megatron's sqrtsoftplus at k > 1 only
        if self.renorm and (self.top_k > 1 or self.score_function == 'sigmoid'):
            w = renorm(w)
        # (T, k) the balance loss's f: top-k of s, no bias, no group limit (DeepSeek-V3 eq. 17)
        plain = s.topk(self.top_k, dim=-1).indices
        return Routing(ids=ids, weights=w, probs=renorm(s), logits=None, balance_ids=plain)

    @classmethod
    @torch.no_grad()
    def after_step(cls, routers, step):
        for router, c in zip(routers, step.counts):
            # Megatron get_updated_expert_bias; torchtitan then subtracts the increment's mean
            delta = router.rate * torch.sign(c.mean() - c)
            router.expert_bias += (delta - delta.mean()) if router.recentre else delta


class QuantileRouter(Router):
    """Quantile balancing (Megatron-LM moe_router_load_balancing_type='quantile_balancing':
    moe_utils.py qb_dual_update, router.py quantile_balancing, finalize_model_grads.py
    _update_router_qb_beta): ids = top-k of Wx - beta, beta a per-expert threshold with no
    gradient; weights = the score function's unbiased scores at the ids (renormalised as Megatron's
    topk_routing_with_score_function). Each training forward estimates beta-hat (Routing.step):
    alpha = each token's (k+1)-th largest Wx - beta, beta-hat_e = the (c+1)-th largest Wx_e - alpha
    over the tokens, so that exactly c = T k / E tokens clear it. After each optimizer step beta <-
    qb_ema beta + (1 - qb_ema) mean(beta-hat) over the step's micro-batches and ranks, minus its
    mean. z-loss on Wx; no balance loss (configs/quantile.py: aux_loss_coef = 0, as Megatron
    asserts). Departures: docs/routers.md."""
    # the weights' score function: 'softmax' (Megatron's default), 'sigmoid' or 'sqrtsoftplus'
    options = dict(qb_score_function='softmax')
    # beta's EMA factor (Megatron moe_router_quantile_balancing_ema; 0 = the step's estimate)
    knobs = dict(qb_ema=0.0)
    limits = dict(qb_score_function=tuple(SCORES), qb_ema='[0, 1)')

    def __init__(self, config):
        super().__init__(config)
        o, E = config.router_options, config.n_experts
        self.score_function, self.ema = o['qb_score_function'], o['qb_ema']
        if self.score_function not in SCORES:
            raise ValueError(f"quantile: qb_score_function={self.score_function!r}: "
                             f"use one of {', '.join(SCORES)}")
        if E < self.top_k + 1:
            raise ValueError(f"quantile: the (top_k + 1)-th expert sets each token's threshold: "
                             f"n_experts={E} must be at least top_k + 1 = {self.top_k + 1}")
        self.gate = nn.Linear(config.n_embd, E, bias=False)
        # beta, float32 (train.py keeps buffers so); in checkpoints
        self.register_buffer('qb_beta', torch.zeros(E))
        self.step_width = E

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        T, E, k = logits.shape[0], self.n_experts, self.top_k
        estimate, learning = None, self.training and torch.is_grad_enabled()
        with torch.no_grad():
            fixed = logits.detach()  # (T, E)
            # (T, k + 1): the k experts and each token's threshold alpha
            top = (fixed - self.qb_beta).topk(k + 1, dim=-1)
            ids = top.indices[:, :k]
            if learning:
                if T * k % E:
                    raise ValueError(f"quantile: T * top_k = {T} * {k} tokens' assignments must "
                                     f"divide among n_experts={E} (Megatron asserts it): change "
                                     f"batch_size or block_size")
                # (E,) the (c+1)-th largest of l - alpha per expert: c tokens lie above it
                estimate = (fixed - top.values[:, k:]).topk(T * k // E + 1, dim=0).values[-1]
        s = SCORES[self.score_function](logits)  # (T, E)
        w = s.gather(1, ids)
        # softmax: over the k logits (Megatron's post-softmax) = renorm; the others at k > 1
        if self.renorm and (k > 1 or self.score_function == 'softmax'):
            w = renorm(w)
        probs = s if self.score_function == 'softmax' else renorm(s)
        return Routing(ids=ids, weights=w, probs=probs, logits=logits, step=estimate)

    @classmethod
    @torch.no_grad()
    def after_step(cls, routers, step):
        # (L, E) the step's mean estimate: the sums of every rank's forwards over their number
        local = step.sums / step.forwards.clamp(min=1)[:, None]
        for router, est in zip(routers, local):
            beta = router.ema * router.qb_beta + (1 - router.ema) * est
            router.qb_beta.copy_(beta - beta.mean())


class TCMoERouter(Router):
    """TC-MoE (modeling_tcmoe.py; LibMoE v2 moe_tcmoe.py): softmax(Wx + [0, -1, -10]) over 2E + k
    slots (+e, -e, null), top-k, w = p / (selected non-null p + all null p), signs +1 / -1 / 0; null
    slots are the cheap id E with no output. As LibMoE: negative slots subtracted (the official
    file's final line adds them), k null slots, balance over non-null assignments, z-loss on the raw
    logits; null reward in training only."""
    # reward for routing to a null slot (skipping compute)
    knobs = dict(null_reward=1e-5)
    limits = dict(null_reward='>= 0')

    def __init__(self, config):
        super().__init__(config)
        E, k = config.n_experts, config.top_k
        # positive, negative and null slots
        self.gate = nn.Linear(config.n_embd, 2 * E + k, bias=False)
        offset = torch.cat([torch.zeros(E), -torch.ones(E), -10 * torch.ones(k)])
        self.register_buffer('offset', offset, persistent=False)
        self.reward = config.router_options['null_reward']

    def forward(self, x, prev=None):
        E = self.n_experts
        # (T, 2E+k), the z-loss's logits (before the offsets, as LibMoE)
        logits = self.gate(x)
        p = (logits + self.offset).softmax(-1)
        v, idx = p.topk(self.top_k, dim=-1)  # (T, k)
        # (T,) every null slot counts as active
        null_mass = p[:, 2 * E:].sum(-1)
        # selected non-null + all null
        w = v / ((v * (idx < 2 * E)).sum(-1, keepdim=True) + null_mass[:, None])
        sign = torch.where(idx < E, 1.0, torch.where(idx < 2 * E, -1.0, 0.0))
        # null slots -> cheap id E, no output
        ids = torch.where(idx < 2 * E, idx % E, E)
        # (T, E) probability of each base expert
        pe = p[:, :E] + p[:, E:2 * E]
        reward = -self.reward * null_mass.mean() if self.training else 0.0
        probs = pe / pe.sum(-1, keepdim=True)
        return Routing(ids=ids, weights=w * sign, probs=probs, logits=logits, loss=reward,
                       all_ffn=False)


class MoEPPRouter(Router):
    """MoE++ (Jin et al. 2024; moe_plus_plus_layer.py Router; LibMoE v2 moe_plus_plus.py): E FFN
    experts and a zero, a copy and a constant expert (cheap ids E, E+1, E+2); logits = Wx + W_r
    (previous MoE layer's logits); softmax, top-k, renorm; balance terms of the cheap experts
    weighted by tau (the paper). As LibMoE, not the official code: a one-layer gate, one constant
    expert at init std 0.002 (official: 1), renorm over the k. No z-loss."""
    # MoE++ gating residual: logits + W_r (the previous MoE layer's logits)
    options = dict(moepp_gate_residual=True)
    # balance-loss factor of the zero / copy / constant experts (1 = homogeneous)
    knobs = dict(moepp_tau=0.75)
    limits = dict(moepp_tau='>= 0')

    def __init__(self, config):
        super().__init__(config)
        d, n = config.n_embd, config.n_experts + 3
        o = config.router_options
        # E FFN experts, zero, copy, constant
        self.gate = nn.Linear(d, n, bias=False)
        # MoE++'s gate_map
        self.residual = nn.Linear(n, n, bias=False) if o['moepp_gate_residual'] else None
        self.const_gate = nn.Linear(d, 2, bias=False)
        # the constant expert's vector c
        self.const = nn.Parameter(0.002 * torch.randn(d))
        eta = torch.ones(n)
        eta[config.n_experts:] = o['moepp_tau']
        self.register_buffer('eta', eta, persistent=False)

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E+3)
        if self.residual is not None and prev is not None:
            # the previous MoE layer's logits (after its own residual)
            logits = logits + self.residual(prev)
        p = logits.softmax(-1)
        w, ids = self.select(p)
        return Routing(ids=ids, weights=w, probs=p, logits=None, balance_weight=self.eta,
                       state=logits, all_ffn=False)

    def cheap_output(self, x, ids, w):
        """zero expert: 0; copy expert: x; constant expert: a0 x + a1 c with a = softmax(W_c x)"""
        E = self.n_experts
        copy_w = (w * (ids == E + 1)).sum(-1, keepdim=True)  # (T, 1)
        const_w = (w * (ids == E + 2)).sum(-1, keepdim=True)  # (T, 1)
        a = self.const_gate(x).softmax(-1)  # (T, 2)
        return copy_w * x + const_w * (a[:, :1] * x + a[:, 1:] * self.const)


class ReMoERouter(Router):
    """ReMoE (Wang et al., ICLR 2025; thu-ml/ReMoE router.py ReLURouter, moe_utils.py, training.py):
    weights = ReLU(Wx), every expert with a positive weight (no top-k, no renorm), slots by weight.
    Training adds the load-balanced L1 penalty lambda E sum_e (c_e / (T k)) mean_t ReLU(Wx)_te, c_e
    = tokens with a positive weight for e; lambda, one value for the model, is multiplied by alpha
    after each step whose sparsity is below 1 - k/E, else divided by it (after_step). No z-loss.
    Departures (the L1 term averaged over layers, the sparsity over the MoE layers, lambda kept on a
    skipped step): docs/routers.md."""
    # lambda_0, the L1 coefficient at the start (ReMoE: 1e-8);
    # lambda's multiplicative step toward sparsity 1 - top_k/E (ReMoE: 1.2)
    knobs = dict(remoe_l1_init=1e-8, remoe_l1_alpha=1.2)
    limits = dict(remoe_l1_init='>= 0', remoe_l1_alpha='>= 1')

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.alpha = config.router_options['remoe_l1_alpha']
        # lambda; in checkpoints
        self.register_buffer('l1_coef', torch.tensor(float(config.router_options['remoe_l1_init'])))

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        g = F.relu(logits)
        # (T, E) every expert, largest weight first
        w, ids = g.sort(-1, descending=True)
        ids = ids.masked_fill(w == 0, UNUSED)
        loss = 0.0
        if self.training and torch.is_grad_enabled():
            # (E,) c_e / (T k)
            f = (g > 0).sum(0) / (g.shape[0] * self.top_k)
            loss = self.l1_coef * self.n_experts * (f * g.mean(0)).sum()
        # the balance probabilities count only if aux_loss_coef > 0
        return Routing(ids=ids, weights=w, probs=logits.softmax(-1), logits=None, loss=loss,
                       all_ffn=False)

    @classmethod
    @torch.no_grad()
    def after_step(cls, routers, step):
        """ReMoE training.py: the step's sparsity 1 - assignments / (tokens E) over all the
        layers"""
        slots = sum(t * r.n_experts for r, t in zip(routers, step.tokens))
        if slots > 0:
            sparsity = 1 - (sum(c.sum() for c in step.counts) / slots).item()
            for r in routers:
                target = 1 - r.top_k / r.n_experts
                r.l1_coef *= r.alpha if sparsity < target else 1 / r.alpha


def cumulative(v):
    """v.cumsum(-1) of v (T, E). Under torch.use_deterministic_algorithms, where float cumsum on
    CUDA raises (torch 2.13's documented list), a sequential sum over the E columns in float64:
    CPU cumsum's own order and accumulator (ReduceOpsKernel.cpp, acc_type<float> is double), so
    every device gives the CPU's values exactly (tests/test_gpu_path.py)"""
    if not torch.are_deterministic_algorithms_enabled():
        return v.cumsum(-1)
    acc, out = v.new_zeros(v.shape[0], dtype=torch.float64), []
    for v_T in v.unbind(-1):
        acc = acc + v_T
        out.append(acc.to(v.dtype))
    return torch.stack(out, -1)


class TopPRouter(Router):
    """Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts"; Dynamic_MoE
    modeling_moe.py top_p_sampling_batched_all_sequence): p = softmax(Wx), experts in order of p
    while their cumulative p is not above the threshold, and the first one above it, at most
    topp_max; weights = p (no renorm). Training adds the paper's dynamic loss topp_entropy_coef *
    mean_t H(p_t) (the code is inference only)."""
    # cumulative probability at which a token stops taking experts (paper: 0.4);
    # most experts per token (0 = n_experts); weight of the dynamic (entropy) loss (paper: 1e-4)
    knobs = dict(topp_threshold=0.4, topp_max=0, topp_entropy_coef=1e-4)
    limits = dict(topp_threshold='[0, 1]', topp_max='>= 0', topp_entropy_coef='>= 0')

    def __init__(self, config):
        super().__init__(config)
        o = config.router_options
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.threshold, self.entropy_coef = o['topp_threshold'], o['topp_entropy_coef']
        self.max = o['topp_max'] or config.n_experts
        if not 1 <= self.max <= config.n_experts:
            raise ValueError(f"topp_max={o['topp_max']} must be between 1 and "
                             f"n_experts={config.n_experts} (0 = all)")

    def select(self, p):
        """top-p of p (T, E) -> weights, ids (T, topp_max): the source's mask cumsum > threshold,
        strict, so a cumulative p equal to the threshold takes one more expert"""
        v, ids = p.sort(-1, descending=True)  # (T, E)
        over = cumulative(v) > self.threshold  # (T, E)
        # the expert whose p crosses the threshold
        crossing = F.one_hot(over.long().argmax(-1), v.shape[1]).bool()
        keep = (~over | crossing)[:, :self.max]  # (T, K)
        return v[:, :self.max] * keep, ids[:, :self.max].masked_fill(~keep, UNUSED)

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        p = logits.softmax(-1)
        w, ids = self.select(p)
        loss = 0.0
        if self.training:
            loss = self.entropy_coef * -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
        return Routing(ids=ids, weights=w, probs=p, logits=None, loss=loss, all_ffn=False)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022; flaxformer routing.py ExpertsChooseMaskedRouter and
    moe_layers.py): p = softmax(Wx); in training each expert takes the C tokens of the micro-batch
    with the largest p (ties: the earlier token, as jax.lax.top_k), weight p: not causal. C =
    max(round(ec_capacity_factor T k / E), 4), Python's round as flaxformer, at most T. In eval
    (model.eval()) the causal rule: each token's top-k of its own p, weights p. No balance loss, no
    z-loss. Departures (the group, the factor k, the cap at T): docs/routers.md."""
    # C = ec_capacity_factor * T * top_k / E tokens per expert (the paper's c = cf * k)
    knobs = dict(ec_capacity_factor=1.0)
    limits = dict(ec_capacity_factor='> 0')
    # flaxformer MoeLayer.min_expert_capacity
    min_capacity = 4

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.capacity_factor = config.router_options['ec_capacity_factor']

    def capacity(self, T):
        """tokens per expert in a group of T tokens: flaxformer's int(round(cf T / E)) with its cf
        = ec_capacity_factor * top_k, at least min_capacity, at most T"""
        C = round(self.capacity_factor * T * self.top_k / self.n_experts)
        return min(T, max(C, self.min_capacity))

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        p = logits.softmax(-1)
        # eval: the causal rule, no token sees another
        if not self.training:
            w, ids = p.topk(self.top_k, dim=-1)
            return Routing(ids=ids, weights=w, probs=p, logits=None)
        C = self.capacity(p.shape[0])
        # (C, E) each expert's C tokens and their gates; stable: ties go to the earlier token
        g, tok = p.sort(dim=0, descending=True, stable=True)
        g, tok = g[:C], tok[:C]
        chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(0, tok, True)  # (T, E)
        # (T, E) p where chosen, else 0
        gate = torch.zeros_like(p).scatter(0, tok, g)
        # per token, its experts first
        w, ids = gate.masked_fill(~chosen, -1.0).sort(-1, descending=True)
        ids = ids.masked_fill(w < 0, UNUSED)
        return Routing(ids=ids, weights=w.clamp_min(0), probs=p, logits=None, all_ffn=False)


ROUTERS = {
    'softmax': SoftmaxRouter,
    'switch': SwitchRouter,
    'sigmoid': SigmoidRouter,
    'cosine': CosineRouter,
    'perturbed_cosine': PerturbedCosineRouter,
    'hyper': HyperRouter,
    'deepseek': DeepSeekRouter,
    'quantile': QuantileRouter,
    'tcmoe': TCMoERouter,
    'moepp': MoEPPRouter,
    'remoe': ReMoERouter,
    'topp': TopPRouter,
    'expert_choice': ExpertChoiceRouter,
}


def router_settings():
    """every registered router's own settings (options and knobs) with their defaults (read when
    asked: routers registered later count too)"""
    return {k: v for cls in ROUTERS.values() for k, v in cls.settings().items()}


def router_knobs():
    """every registered router's training knobs with their defaults"""
    return {k: v for cls in ROUTERS.values() for k, v in cls.knobs.items()}


def router_limits():
    """every registered router's limits (Router.limits)"""
    return {k: v for cls in ROUTERS.values() for k, v in cls.limits.items()}

# -----------------------------------------------------------------------------
# aux losses

def assignment_counts(ids, n, n_seq=1):
    """ids (T, K) -> (n_seq, n) assignments per expert in each of n_seq equal runs of tokens
    (sequences); UNUSED slots and ids >= n (cheap experts outside the balance loss, tcmoe's null
    slots) are not assignments"""
    # (n_seq, T/n_seq * K); id n = not counted
    idx = torch.where(ids < 0, n, ids.clamp(max=n)).view(n_seq, -1)
    ones = torch.ones(idx.shape, device=ids.device)
    counts = torch.zeros(n_seq, n + 1, device=ids.device).scatter_add_(1, idx, ones)
    return counts[:, :n]


def balance_loss(probs, ids, n_seq=1, weight=None, counts=None):
    """n * sum_e eta_e f_e P_e per sequence, averaged; probs (T, n), ids (T, K). f_e = the share of
    the assignments to the n experts that went to e (ids >= n and UNUSED slots are not assignments);
    P_e = the mean probability; eta = weight (n,), 1 by default (MoE++'s tau). counts (n,): f from
    these counts instead of from ids (balance_scope='global': the step's counts over every rank)"""
    T, n = probs.shape
    c = assignment_counts(ids, n, n_seq) if counts is None else counts[None]  # (B, n)
    # (B, n) share of the assignments
    f = c / c.sum(-1, keepdim=True).clamp_min(1)
    # (B, n) mean probability
    P = probs.view(n_seq, -1, n).mean(1)
    return n * (f * P * (1 if weight is None else weight)).sum(-1).mean()


def z_loss(logits):
    return torch.logsumexp(logits, dim=-1).square().mean()

# -----------------------------------------------------------------------------
# routing statistics (the MoE layer's counters and eval.py's analysis)

def weight_sums(w):
    """sums over the tokens of w (T, k), defined for signed weights (tcmoe) too: the entropy of the
    slots' weights (q = |w| / sum |w|), the router margin |w|_(1) - |w|_(2) (the two largest
    magnitudes; w1 - w2 for weights >= 0, LibMoE's router_magine; |w|_(1) when k = 1), and the
    number of negative weights"""
    a = w.abs()
    q = a / (a.sum(-1, keepdim=True) + 1e-20)  # (T, k)
    top = a.topk(min(2, w.shape[1]), dim=-1).values
    margin = top[:, 0] - top[:, 1] if w.shape[1] > 1 else top[:, 0]
    return -(q * q.clamp_min(1e-20).log()).sum(), margin.sum(), (w < 0).sum().float()


def expert_load(ids, E):
    """assignments per FFN expert (E,) of ids (T, K): cheap ids (>= E) and UNUSED slots are not
    counted"""
    return torch.bincount(torch.where(ids < 0, E, ids.clamp(max=E)).flatten(), minlength=E + 1)[:E]


def drop_top1(ids, w):
    """eval.py's Drop-Top-1: each token loses its first choice (slot 0); the other slots keep their
    signs and are scaled to the total |w| of the k slots (for weights >= 0: the same total weight).
    A token whose other slots carry no weight (a null slot, UNUSED slots) gets no routed output.
    (T, K) -> (T, K-1)"""
    rest = w[:, 1:]
    left = rest.abs().sum(-1, keepdim=True)  # (T, 1)
    scale = torch.where(left > 0, w.abs().sum(-1, keepdim=True) / left.clamp_min(1e-20), 0.0)
    return ids[:, 1:], rest * scale


def load_stats(load):
    """assignments per expert (E,) -> the load, its coefficient of variation, max/mean and
    entropy"""
    share = load / load.sum().clamp_min(1)
    mean = load.mean().clamp_min(1e-20)
    return dict(load=load.tolist(), load_cv=(load.std(correction=0) / mean).item(),
                max_over_mean=(load.max() / mean).item(),
                load_entropy=-(share * share.clamp_min(1e-20).log()).sum().item())

# -----------------------------------------------------------------------------
# experts and expert parallelism

def activation(h, arch):
    """the MLP nonlinearity of each block flavour: GELU (tanh) for gpt2, SwiGLU for llama (h =
    [gate, up])"""
    if arch == 'gpt2':
        return F.gelu(h, approximate='tanh')
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def weigh(t, w_N1):
    """t times each row's combine weight w_N1 (N, 1); None = unweighted (shared experts: no multiply
    by ones)"""
    return t if w_N1 is None else t * w_N1


def compute_dtype(t):
    """the dtype t's matmuls run in: autocast's where it is on for t's device, else t's own"""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def expert_path(impl, device, dtype, widths):
    """(grouped, why): whether the experts run as F.grouped_mm, and why, for train.py's log line.
    'grouped' and 'loop' are taken as given; 'auto' takes grouped_mm only where torch runs its
    fused kernel, the loop elsewhere. widths: the matrices' row lengths (n_embd, expert_hidden)."""
    size = torch.finfo(dtype).bits // 8
    # F.grouped_mm's operands need 16-byte row strides (GroupedMMUtils.h)
    aligned = all(n * size % 16 == 0 for n in widths)
    if impl == 'grouped' and not aligned:
        raise ValueError(f"expert_impl='grouped' needs n_embd and expert_hidden to be multiples of "
                         f"{16 // size} in {dtype} (F.grouped_mm's 16-byte rows): "
                         f"use expert_impl='auto' or 'loop'")
    if impl != 'auto':
        return impl == 'grouped', f"expert_impl={impl!r}"
    # torch 2.13 aten/src/ATen/native/cuda/GroupedBlas.cpp, _grouped_mm_cuda: the fused (CUTLASS)
    # kernel runs for bf16 operands and output where _scaled_mm_allowed_device(sm90_only,
    # sm100_only) holds, compute capability major 9 or 10; everything else (CPU, sm80/86/89,
    # sm110/120/121, fp16, fp32) takes _grouped_mm_fallback (GroupedMMUtils.h): offs.cpu(), a host
    # sync, then one mm per group, which the loop does without the sync
    loop_there = "torch's grouped_mm is a per-group loop there"
    if device.type != 'cuda':
        return False, f"{device.type}: {loop_there}"
    if torch.version.hip:
        # ROCm builds take the fused path only with composable kernels on gfx942 / gfx950
        return False, f"ROCm: {loop_there} unless built with CK (not checked here)"
    props = torch.cuda.get_device_properties(device)
    gpu = f"{props.name.removeprefix('NVIDIA ')} sm{props.major}{props.minor}"
    if props.major not in (9, 10):
        return False, f"{gpu}: {loop_there}"
    if dtype != torch.bfloat16:
        name = str(dtype).removeprefix('torch.')
        return False, f"{gpu}, {name}: torch's fused grouped_mm takes bf16 only"
    if not aligned:
        return False, (f"{gpu}, bf16: n_embd and expert_hidden are not multiples of 8 "
                       f"(grouped_mm's 16-byte rows)")
    return True, f"{gpu}, bf16"


class Experts(nn.Module):
    """n MLPs in the block's flavour, stacked: c_fc (n, out, d), c_proj (n, d, hidden), biases for
    gpt2. impl: 'grouped' (one F.grouped_mm per matrix over all experts' rows), 'loop' (one F.linear
    per expert) or 'auto'. Rows: N, sorted by expert; counts_n: the rows of each of the n
    experts."""

    def __init__(self, config, n, hidden, width=None):
        super().__init__()
        # width: the rows' size (None = n_embd; latent experts: moe_latent_size)
        d, out = width or config.n_embd, hidden * (1 if config.arch == 'gpt2' else 2)
        self.arch, self.impl = config.arch, config.expert_impl
        self.c_fc = nn.Parameter(torch.empty(n, out, d))
        self.c_proj = nn.Parameter(torch.empty(n, d, hidden))
        self.b_fc = nn.Parameter(torch.zeros(n, out)) if config.bias else None
        self.b_proj = nn.Parameter(torch.zeros(n, d)) if config.bias else None

    def path(self, device, dtype):
        """expert_path for these experts' widths: (grouped, why)"""
        # c_proj's (d, hidden); c_fc's rows are 1 or 2 x hidden
        return expert_path(self.impl, device, dtype, self.c_proj.shape[1:])

    def forward(self, x_ND, counts_n=None, w_N=None, combine=None):
        """x_ND sorted by expert, counts_n (n,) rows per expert (None: one expert takes every row,
        a count the host knows: shared experts), w_N (N,) or None: each row's combine weight,
        applied to the hidden activation -> the rows' outputs (N, d); with combine = (token_N, T):
        their sums per token (T, d), with no (N, d) copy"""
        dt = compute_dtype(x_ND)
        sizes = None
        if counts_n is None:
            sizes = [x_ND.shape[0]]
            counts_n = torch.full((1,), x_ND.shape[0], device=x_ND.device)
        # (N, 1); None: unweighted (shared experts)
        w_N1 = None if w_N is None else w_N[:, None].to(dt)
        token_N, y_TD = None, None
        if combine is not None:
            token_N, y_TD = combine[0], x_ND.new_zeros(combine[1], x_ND.shape[1], dtype=dt)
        if self.path(x_ND.device, dt)[0]:
            # bf16 traces into torch.compile's graph; other dtypes run eagerly (grouped_eager)
            grouped = self.grouped if dt == torch.bfloat16 else self.grouped_eager
            y_ND = grouped(x_ND.to(dt), counts_n, w_N1)
            return y_ND if y_TD is None else y_TD.index_add_(0, token_N, y_ND)
        if sizes is None:
            # the loop's host sync: the rows per expert
            sizes = counts_n.tolist()
        return self.loop(x_ND, sizes, w_N1, token_N, y_TD)

    def grouped(self, x_ND, counts_n, w_N1):
        # grouped_mm is not autocast-aware: cast as F.linear would be
        dt = x_ND.dtype
        N = x_ND.shape[0]
        # (n,) end row of each expert
        offs = counts_n.cumsum(0).to(torch.int32)
        # (n, 1, 1) experts with rows: the weight gradients of the others are set to exactly 0
        # (torch.where's backward), as the loop gives; torch's fused kernel on sm100 gives them
        # non-zero values (pytorch/pytorch#172439, open), which AdamW would then apply
        used = (counts_n > 0)[:, None, None]
        c_fc = torch.where(used, self.c_fc.to(dt), 0)
        c_proj = torch.where(used, self.c_proj.to(dt), 0)
        h = F.grouped_mm(x_ND, c_fc.transpose(1, 2), offs=offs)  # (N, out)
        if self.b_fc is not None:
            # each row's expert bias
            h = h + self.b_fc.to(dt).repeat_interleave(counts_n, dim=0, output_size=N)
        a = weigh(activation(h, self.arch), w_N1)  # (N, hidden)
        y_ND = F.grouped_mm(a, c_proj.transpose(1, 2), offs=offs)
        if self.b_proj is not None:
            b_ND = self.b_proj.to(dt).repeat_interleave(counts_n, dim=0, output_size=N)
            y_ND = y_ND + weigh(b_ND, w_N1)
        return y_ND

    # eager inside torch.compile: torch 2.13's meta kernel of _grouped_mm takes bf16 only
    # (torch/_meta_registrations.py, _meta_grouped_mm_common)
    grouped_eager = torch.compiler.disable(grouped)

    def loop(self, x_ND, sizes, w_N1, token_N=None, y_TD=None):
        """one F.linear per expert on unbind(0) views (c_fc[e] per expert would make autograd build
        n full-size gradient buffers); with y_TD, each expert's outputs go straight into their
        tokens' rows (no torch.cat of the N outputs)"""
        n = len(sizes)
        b_fc = [None] * n if self.b_fc is None else self.b_fc.unbind(0)
        b_proj = [None] * n if self.b_proj is None else self.b_proj.unbind(0)
        tokens = [None] * n if token_N is None else token_N.split(sizes)
        weights = [None] * n if w_N1 is None else w_N1.split(sizes)
        experts = zip(x_ND.split(sizes), weights, tokens, self.c_fc.unbind(0), b_fc,
                      self.c_proj.unbind(0), b_proj)
        ys = []
        for xe, we, te, w1, b1, w2, b2 in experts:
            ye = F.linear(weigh(activation(F.linear(xe, w1, b1), self.arch), we), w2)
            ye = ye if b2 is None else ye + weigh(b2, we)
            if y_TD is None:
                ys.append(ye)
            else:
                y_TD.index_add_(0, te, ye.to(y_TD.dtype))
        return torch.cat(ys) if y_TD is None else y_TD


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the same exchange with the splits
    swapped"""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None

# -----------------------------------------------------------------------------
# the layer

# a layer's statistics counters, summed over forwards and all-reduced as one tensor by train.py;
# slots: used slots (ids >= 0); entropy, margin, negative: weight_sums
SUMS = ('tokens', 'assignments', 'dropped', 'entropy', 'margin', 'slots', 'negative')


class MoE(nn.Module):
    """router -> sort-based dispatch -> experts -> weighted combine (+ cheap experts, + shared
    experts). Index spaces: T tokens, K slots per token, N kept FFN assignments (sorted by expert),
    E experts; under expert parallelism R ranks of E_r = E / R local experts each, M rows
    received."""

    def __init__(self, config, hidden):
        super().__init__()
        if config.router not in ROUTERS:
            raise ValueError(f"unknown router '{config.router}': "
                             f"choose one of {', '.join(ROUTERS)} (or 'dense')")
        if not 1 <= config.top_k <= config.n_experts:
            raise ValueError(f"top_k={config.top_k} must be between 1 and "
                             f"n_experts={config.n_experts}")
        if config.n_experts % config.ep_size:
            raise ValueError(f"n_experts={config.n_experts} is not divisible by "
                             f"ep_size={config.ep_size}: pick an ep_size that divides it")
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.capacity_factor = config.capacity_factor
        # 0 = dropless at eval, as nanoMoE
        self.eval_capacity_factor = config.eval_capacity_factor
        self.routed_scale, self.shared_scale = config.routed_scale, config.shared_scale
        # 'batch', 'sequence' or 'global'
        self.balance_scope = config.balance_scope
        # global scope: the group set by set_balance_group, and this step's counts so far
        self.balance_group, self.balance_counts = None, None
        # benchmarking: balanced round-robin ids in place of the router's
        self.force_balance = config.force_balance
        self.router = ROUTERS[config.router](config)
        # the group is set by set_expert_parallel
        self.ep_size, self.ep_group = config.ep_size, None
        # latent experts (Megatron moe_latent_size): the routed experts work in this width, between
        # a down-projection of the tokens before dispatch and an up-projection of the combined sum
        latent = config.moe_latent_size
        self.fc1_latent = nn.Linear(config.n_embd, latent, bias=config.bias) if latent else None
        self.fc2_latent = nn.Linear(latent, config.n_embd, bias=config.bias) if latent else None
        self.experts = Experts(config, config.n_experts // config.ep_size, hidden, width=latent)
        self.shared = None
        if config.n_shared_experts:
            width = config.shared_hidden or hidden * config.n_shared_experts
            self.shared = Experts(config, 1, width)
        # Qwen2-MoE
        self.shared_gate = nn.Linear(config.n_embd, 1, bias=False) if config.shared_gate else None
        # eval.py's analysis, switched on and off by moe.analysis only
        self._drop_top1, self._records = False, None
        # routing trace and replay, switched on and off by moe.routing only
        self._trace, self._scores, self._replay = None, False, None
        # the ids replayed in the last forward (a recomputation takes them again)
        self._replayed = None
        # load: since the last reset_stats; step_counts: since the last end_step
        for name in ('load', 'step_counts'):
            self.register_buffer(name, torch.zeros(config.n_experts), persistent=False)
        # tokens and forwards of the training forwards since the last end_step, and the sums of
        # their Routing.step
        self.register_buffer('step_tokens', torch.zeros(()), persistent=False)
        self.register_buffer('step_forwards', torch.zeros(()), persistent=False)
        self.register_buffer('step_sums', torch.zeros(self.router.step_width), persistent=False)
        # running sums of SUMS, in that order
        self.register_buffer('sums', torch.zeros(len(SUMS)), persistent=False)

    def forward(self, x, prev=None):
        """x (B, S, d), prev: the previous MoE layer's aux['state'] (None in the first) -> y, aux:
        the unweighted balance and z-losses, the router's own weighted loss, and `state` for the
        next MoE layer's router"""
        B, S, d = x.shape
        x_TD = x.reshape(-1, d)
        # activation checkpointing's second run of a forward that has counted: it counts, records
        # and draws nothing new (its statistics, trace, replayed ids and global counts are the
        # first run's)
        again = recomputing()
        with torch.autocast(x.device.type, enabled=False):
            r = self.router(x_TD.float(), prev)
        ids_TK, w_TK = r.ids, r.weights
        if self._replay is not None:
            # a recorded routing: its ids, the current router's weights for them
            if not again:
                self._replayed = next(self._replay).to(x.device)
            ids_TK = self._replayed
            w_TK = self.router.replay_weights(r, ids_TK)
        if self._trace is not None and not again:
            kept = dict(ids=ids_TK.detach().cpu(), weights=w_TK.detach().float().cpu())
            if self._scores:
                kept['scores'] = r.probs.detach().cpu()
            if self._scores and r.logits is not None:
                kept['logits'] = r.logits.detach().cpu()
            self._trace.append(kept)
        if self.force_balance:
            # Megatron / torchtitan: balanced round-robin ids, the router's probabilities there
            slots = torch.arange(x_TD.shape[0] * self.top_k, device=x.device)
            ids_TK = slots.view(-1, self.top_k) % self.n_experts
            w_TK = r.probs.gather(1, ids_TK)
        if self._drop_top1:
            # eval.py's analysis: the first choice masked, the others keep the total |w|
            if ids_TK.shape[1] < 2:
                raise ValueError("drop_top1 needs top_k >= 2: "
                                 "with one expert per token nothing would be left")
            ids_TK, w_TK = drop_top1(ids_TK, w_TK)
        scaled_TK = w_TK * self.routed_scale
        # balanced ids and Drop-Top-1's fewer slots keep a full routing full
        all_ffn = (r.all_ffn and self._replay is None) or self.force_balance
        # latent experts: the router, the cheap and the shared experts see x_TD in full
        routed_TD = x_TD if self.fc1_latent is None else self.fc1_latent(x_TD)
        y, load_E, dropped = self.routed(routed_TD, ids_TK, scaled_TK, all_ffn)
        if self.fc2_latent is not None:
            y = self.fc2_latent(y)
        cheap = self.router.cheap_output(x_TD.float(), ids_TK, scaled_TK)
        if cheap is not None:
            y = y + cheap
        if self.shared is not None:
            s = self.shared(x_TD)  # (T, d)
            if self.shared_gate is not None:
                # Qwen2-MoE: sigmoid(w . x) scales the shared experts' output
                s = torch.sigmoid(self.shared_gate(x_TD)) * s
            y = y + self.shared_scale * s
        training_step = self.training and torch.is_grad_enabled()
        if not again:
            self.record_stats(ids_TK, w_TK, load_E, dropped, training_step, r.step)
        counted_TK = ids_TK if r.balance_ids is None or self.force_balance else r.balance_ids
        balance = self.balance(r.probs, counted_TK, B, r.balance_weight, training_step, again)
        z = x.new_zeros((), dtype=torch.float32) if r.logits is None else z_loss(r.logits)
        aux = dict(balance=balance, z=z, router=r.loss, state=r.state)
        return y.to(x.dtype).view(B, S, d), aux

    def balance(self, probs, ids, B, weight, training_step, again=False):
        """the balance loss in this layer's scope: 'batch' (f and P over the micro-batch),
        'sequence' (DeepSeek-V3: per sequence, averaged), 'global' (Megatron's global_aux_loss: f
        from the counts of this step's micro-batches so far summed over balance_group's ranks, P
        local; in training steps only, else 'batch'). again: a recomputation, whose counts are
        already in. docs/routers.md"""
        if self.balance_scope == 'global' and training_step:
            if not again:
                # (n,) this micro-batch's assignments
                c = assignment_counts(ids, probs.shape[1])[0]
                if self.balance_group is not None:
                    dist.all_reduce(c, group=self.balance_group)
                self.balance_counts = c if self.balance_counts is None else self.balance_counts + c
            return balance_loss(probs, ids, 1, weight, counts=self.balance_counts)
        return balance_loss(probs, ids, B if self.balance_scope == 'sequence' else 1, weight)

    def routed(self, x_TD, ids_TK, w_TK, all_ffn):
        """sorted dispatch of the T*K slots' assignments to the FFN experts, then the weighted sum
        over each token's slots -> (y (T, d), assignments per expert before any drop (E,), dropped
        count). all_ffn: every slot holds an FFN expert (Routing.all_ffn).
        Host syncs per call: none for a full routing on the grouped path, one where the count of
        FFN assignments is read (UNUSED slots, cheap experts), one for a capacity's boolean mask,
        one in the loop (its rows per expert), one under EP (the splits); gpu_check.py counts
        them on a GPU."""
        T, E = x_TD.shape[0], self.n_experts
        # capacity's k: top_k (hyper's current k; the target of variable routers)
        k = min(ids_TK.shape[1], self.top_k)
        # (K*T,) slot-major: every first choice comes before any second choice
        ids_KT = ids_TK.t().reshape(-1)
        # (K*T,) UNUSED slots and cheap ids sort last, as expert E
        expert_KT = torch.where(ids_KT < 0, E, ids_KT.clamp(max=E))
        # (K*T,) slots by expert: the FFN assignments first, then what costs no FFN
        order_KT = expert_KT.argsort(stable=True)
        # (E,) assignments per expert: a scatter_add_, as CUDA's bincount syncs twice (min, max)
        ones_KT = torch.ones_like(expert_KT)
        load_E = expert_KT.new_zeros(E + 1).scatter_add_(0, expert_KT, ones_KT)[:E]
        # the number of FFN assignments: a host sync unless every slot holds one
        n = ids_TK.numel() if all_ffn else int(load_E.sum())
        order_N, counts_E = order_KT[:n], load_E
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor > 0:
            cap = math.ceil(capacity_factor * k * T / E)
            # each assignment's place in its expert's queue
            start_N = (load_E.cumsum(0) - load_E).repeat_interleave(load_E, output_size=n)
            place_N = torch.arange(n, device=x_TD.device) - start_N
            order_N, counts_E = order_N[place_N < cap], load_E.clamp(max=cap)
        # from here N counts the kept assignments
        token_N = order_N % T
        x_ND = x_TD.index_select(0, token_N)
        w_N = w_TK.t().reshape(-1)[order_N]
        y_TD = self.run_experts(x_ND, counts_E, w_N, combine=(token_N, T))
        return y_TD, load_E, n - counts_E.sum()

    def run_experts(self, x_ND, counts_E, w_N, combine):
        """x_ND sorted by global expert id, counts_E rows per expert, w_N their combine weights,
        combine = (token_N, T): run the experts, wherever they live -> (T, d) each token's weighted
        sum"""
        if self.ep_size == 1:
            return self.experts(x_ND, counts_E, w_N, combine)
        R, E_r = self.ep_size, self.n_experts // self.ep_size
        # (E,) recv_E[r * E_r + j]: the rows rank r sends to my local expert j
        recv_E = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_E, counts_E, group=self.ep_group)
        # rows to each rank, rows from each rank: the exchange's one host sync
        send_R, recv_R = torch.stack([counts_E.view(R, E_r).sum(1),
                                      recv_E.view(R, E_r).sum(1)]).tolist()
        # the rows and weights travel in the compute dtype (bf16 under bf16 autocast, not the
        # norm's fp32): the experts cast them so anyway
        dt = compute_dtype(x_ND)
        # (M, d) rank-major, then expert; (M, 1) their weights
        x_MD = AllToAll.apply(x_ND.to(dt), recv_R, send_R, self.ep_group)
        w_M1 = AllToAll.apply(w_N[:, None].to(dt), recv_R, send_R, self.ep_group)
        # (M,) the local expert of each received row
        local_M = torch.arange(E_r, device=x_ND.device).repeat(R)
        local_M = local_M.repeat_interleave(recv_E, output_size=sum(recv_R))
        # (M,) rank-major -> local-expert-major
        regroup_M = local_M.argsort(stable=True)
        y_MD = self.experts(x_MD[regroup_M], recv_E.view(R, E_r).sum(0), w_M1[regroup_M, 0])
        # back to rank-major, in the compute dtype the tokens' sums are taken in (a bias may have
        # promoted the loop's rows to fp32)
        y_MD = y_MD.new_empty(y_MD.shape, dtype=dt).index_copy_(0, regroup_M, y_MD.to(dt))
        # (N, d) back where they came from
        y_ND = AllToAll.apply(y_MD, send_R, recv_R, self.ep_group)
        token_N, T = combine
        return y_ND.new_zeros(T, y_ND.shape[1]).index_add_(0, token_N, y_ND)

    @torch.no_grad()
    def record_stats(self, ids, w, load, dropped, training_step, step=None):
        """training_step: a training forward with gradients, not a recomputation (MoE.forward);
        step: its Routing.step"""
        self.load += load
        if training_step:
            # counts for the routers that learn after each step (deepseek's bias, remoe's
            # coefficient, quantile's beta)
            self.step_counts += load
            self.step_tokens += ids.shape[0]
            self.step_forwards += 1
            if step is not None:
                self.step_sums += step
        entropy, margin, negative = weight_sums(w)
        # new_full: a fill on the device (new_tensor would copy from the host and sync)
        now = dict(tokens=entropy.new_full((), ids.shape[0]), assignments=load.sum().float(),
                   dropped=dropped.float(), entropy=entropy, margin=margin,
                   slots=(ids >= 0).sum().float(), negative=negative)
        self.sums += torch.stack([now[k] for k in SUMS])
        if self._records is not None:
            self._records.append((ids.cpu(), w.cpu()))

    def stats(self):
        """routing statistics since the last reset: load per expert and its CV, max/mean, entropy of
        the load, experts per token (FFN assignments per token before any drop: k for top-k routers,
        variable for remoe, topp, expert_choice, fewer for cheap experts), mean entropy of the
        slots' weights, router margin (|w|_(1) - |w|_(2)), dropped fraction, share of the used slots
        with a negative weight"""
        s = dict(zip(SUMS, self.sums.tolist()))
        per_token = max(s['tokens'], 1)
        return dict(**load_stats(self.load), experts_per_token=s['assignments'] / per_token,
                    weight_entropy=s['entropy'] / per_token, margin=s['margin'] / per_token,
                    dropped=s['dropped'] / max(s['assignments'], 1),
                    negative=s['negative'] / max(s['slots'], 1))

    def reset_stats(self):
        self.load.zero_()
        self.sums.zero_()


def recomputing():
    """whether this forward runs inside a backward pass: torch.utils.checkpoint's recomputation
    (use_reentrant=False, torch's advice, as model.Block runs it) of a forward that has already
    counted. Megatron counts where grad is enabled, right for its checkpoint's no-grad first
    forward; torchtitan counts both forwards (optimizer.py halves the counts under activation
    checkpointing)."""
    return torch._C._current_graph_task_id() != -1


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


@contextmanager
def analysis(model, drop_top1=False, record=False):
    """eval.py's routing analysis of every MoE layer of model: inside, drop_top1 removes each
    token's first choice, and with record each forward appends its (ids, weights) CPU tensors to the
    layer's list; yields records, one list per MoE layer (empty unless record). Everything is
    restored on exit."""
    layers = moe_layers(model)
    records = [[] for _ in layers]
    before = [(m._drop_top1, m._records) for m in layers]
    for m, kept in zip(layers, records):
        m._drop_top1, m._records = drop_top1, kept if record else None
    try:
        yield records
    finally:
        for m, (dropping, kept) in zip(layers, before):
            m._drop_top1, m._records = dropping, kept


@contextmanager
def routing(model, trace=None, replay=None, scores=False):
    """routing trace and replay (Megatron router_trace.py, router_replay.py) of every MoE layer of
    model: with trace (one list per MoE layer), each forward appends its routing, dict(ids (T, K),
    weights (T, K) float32; with scores also the router's probabilities (T, n) and its logits
    where its Routing has them) on the CPU; with replay (a trace's lists, as load_trace returns),
    each forward takes its layer's next recorded ids in order and the current router's weights for
    them (Router.replay_weights). Neither: a pause of both. Everything is restored on exit."""
    layers = moe_layers(model)
    for given, what in ((trace, 'trace'), (replay, 'replay')):
        if given is not None and len(given) != len(layers):
            raise ValueError(f"the {what} has {len(given)} MoE layers, the model {len(layers)}: "
                             f"record and replay with the same model")
    before = [(m._trace, m._scores, m._replay) for m in layers]
    for j, m in enumerate(layers):
        m._trace = None if trace is None else trace[j]
        m._scores = scores
        m._replay = None if replay is None else replayed(replay[j], j)
    try:
        yield trace
    finally:
        for m, (t, sc, rp) in zip(layers, before):
            m._trace, m._scores, m._replay = t, sc, rp


def replayed(records, layer):
    """the recorded ids of one layer in order; a forward past the last one is an error"""
    yield from (rec['ids'] for rec in records)
    raise ValueError(f"the routing trace holds {len(records)} forwards of MoE layer {layer}; this "
                     f"run makes more: replay the forwards that were recorded")


def save_trace(path, trace):
    """a trace (one list of records per MoE layer) as a torch file: exact ids and float32 weights,
    read back without unpickling code (load_trace)"""
    torch.save(dict(layers=trace), path)


def load_trace(path):
    """save_trace's lists, one per MoE layer"""
    return torch.load(path, map_location='cpu', weights_only=True)['layers']


def set_expert_parallel(model, group):
    """the process group in which every MoE layer exchanges tokens (its ranks hold E/ep_size experts
    each)"""
    for m in moe_layers(model):
        m.ep_group = group


def end_step(model, group=None, update=True):
    """after each optimizer step (update=False: a skipped one): the routers that learn after each
    step (those that override Router.after_step) get a Step of each of their layers (assignment
    counts, tokens, forwards, sums of Routing.step), summed over every rank in one all-reduce; then
    every layer counts the next step afresh
    (the 'global' balance scope too: Megatron's reset_global_aux_loss_tracker)"""
    layers = moe_layers(model)
    learners = [m for m in layers if m.router.learns_after_step()]
    if update and learners:
        # each layer's row (E + 2 + m): counts per expert, tokens, forwards, sums; one all-reduce
        rows = [torch.cat([m.step_counts, m.step_tokens[None], m.step_forwards[None], m.step_sums])
                for m in learners]
        c = torch.cat(rows)
        if dist.is_initialized():
            dist.all_reduce(c, group=group)
        rows = c.split([len(row) for row in rows])
        by_class = {}
        for m, row in zip(learners, rows):
            by_class.setdefault(type(m.router), []).append((m.router, row))
        for cls, pairs in by_class.items():
            routers, c = zip(*pairs)
            # (L, E + 2 + m): the class's routers have equal widths
            c = torch.stack(c)
            E = routers[0].n_experts
            cls.after_step(list(routers), Step(counts=c[:, :E], tokens=c[:, E],
                                               forwards=c[:, E + 1], sums=c[:, E + 2:]))
    for m in layers:
        m.step_counts.zero_()
        m.step_tokens.zero_()
        m.step_forwards.zero_()
        m.step_sums.zero_()
        m.balance_counts = None


def set_balance_group(model, group):
    """the process group whose ranks' assignment counts the 'global' balance scope sums (train.py:
    every rank, as each holds other tokens; None = this process only)"""
    for m in moe_layers(model):
        m.balance_group = group


def set_progress(model, frac):
    """the fraction of training done, for the routers that schedule on it (hyper's k)"""
    for m in model.modules():
        if isinstance(m, Router):
            m.progress = frac

# -----------------------------------------------------------------------------
# expert parallelism outside the layer: whole-model tensors, gradients, statistics


def expert_groups(ep_size):
    """(this rank's EP group, its expert data-parallel group) in the default process group: EP
    groups of ep_size consecutive ranks; expert data-parallel groups of the ranks holding the same
    experts. Every rank creates every group, as torch.distributed requires."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ep_group = expert_dp_group = None
    for g in range(world_size // ep_size):
        group = dist.new_group(list(range(g * ep_size, (g + 1) * ep_size)))
        ep_group = group if rank // ep_size == g else ep_group
    for j in range(ep_size):
        group = dist.new_group(list(range(j, world_size, ep_size)))
        expert_dp_group = group if rank % ep_size == j else expert_dp_group
    return ep_group, expert_dp_group


def is_expert(name):
    """a routed expert's parameter (or its optimizer state): sharded over the EP group"""
    return '.experts.' in name


def full_tensor(name, t, ep_size, group):
    """a parameter (or its optimizer state) as the whole model has it: expert shards gathered"""
    if ep_size == 1 or not is_expert(name) or t.dim() == 0:
        return t
    parts = [torch.empty_like(t) for _ in range(ep_size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def local_tensor(name, t, ep_size, rank):
    """this rank's shard of a whole-model tensor"""
    if ep_size == 1 or not is_expert(name) or t.dim() == 0:
        return t
    return t.chunk(ep_size)[rank % ep_size].clone()


def clip_grad_norm(model, max_norm, ep_size=1, ep_group=None, expert_dp_group=None,
                   sharded=False):
    """the true global gradient norm (every parameter counted once over all ranks), clipped to
    max_norm when max_norm > 0. DDP with ep_size > 1: expert grads first summed over the ranks
    holding the same experts (scaled so the step equals one process's), then dense grads counted
    once and each expert once over the EP group. sharded (FSDP): every gradient is already reduced
    and each element lives on one rank, so the local shards' squares sum over all ranks"""
    device = next(model.parameters()).device
    dense, expert = torch.zeros((), device=device), torch.zeros((), device=device)
    grads = []  # this rank's gradient tensors (an FSDP shard's local part)
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if sharded else p.grad
        grads.append(g)
        if ep_size > 1 and is_expert(n) and not sharded:
            dist.all_reduce(g, group=expert_dp_group)
            g.div_(dist.get_world_size())
            expert += g.float().square().sum()
        else:
            dense += g.float().square().sum()
    if sharded:
        dist.all_reduce(dense)
    elif ep_size > 1:
        dist.all_reduce(expert, group=ep_group)
    norm = (dense + expert).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale)
    return norm


def log_stats(layers):
    """load CV and dropped fraction averaged over the MoE layers, and each layer's load CV and load
    per expert (assignments since the last log), from counts summed over all ranks; the counts
    reset"""
    for m in layers:
        if dist.is_initialized():
            dist.all_reduce(m.load)
            dist.all_reduce(m.sums)
    stats = [m.stats() for m in layers]
    for m in layers:
        m.reset_stats()
    if not stats:
        return {}
    means = {k: sum(s[k] for s in stats) / len(stats)
             for k in ('load_cv', 'dropped', 'experts_per_token')}
    per_layer = {'layer_load_cv': [s['load_cv'] for s in stats],
                 'layer_load': [s['load'] for s in stats]}
    return {**means, **per_layer}
