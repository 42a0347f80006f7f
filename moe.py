"""
The Mixture-of-Experts layer: every router, the aux losses, the experts, dispatch, expert parallelism
and routing statistics. One file, so a router can be read (and added) next to everything it plugs into.

Routers (x: token (d), E experts, k = top_k, W: E x d; all router math in float32; "renorm" = divide the
k weights by their sum, on by default where the source does it, switchable with router_renorm). Each row is
checked in tests/ against the source named in the last column (a Hugging Face module with copied weights, or a
transcription of the source file written in tests/test_routers.py, not from this file):

| name             | formula                                                           | z-loss | source file (checked against)               |
|------------------|-------------------------------------------------------------------|--------|---------------------------------------------|
| softmax          | p = softmax(Wx); top-k of p; renorm (off = OLMoE / Qwen2-MoE)     | l      | HF Mixtral / OLMoE blocks; LibMoE smoe.py    |
| switch           | k = 1; p = softmax(W(x * U(1-eps, 1+eps))); weight = max p        | none   | Switch Transformer (Fedus et al. 2021)       |
| sigmoid          | s = sigmoid(Wx); top-k of s; renorm; balance probs s / sum(s)     | l      | LibMoE smoe_sigmoidgating.py, moe_layer.py   |
| cosine xmoe      | r = Px (E/2 dims), M rows set to norm 1.5 (in place, no grad);    | none   | LibMoE v2 xmoe.py                            |
|                  | l = <r/|r|, M_e>; p = softmax(l / 0.3); top-k of p; softmax(top k)|        |                                              |
| cosine libmoe    | l = cos(x, W_e) (full dim, no tau); p = softmax(l); ids = top-k   | none   | LibMoE v1.1 moe_cosinegating.py (Cosine-R)   |
|                  | of p + b (gate bias); weights = softmax of those k values         |        |                                              |
| perturbed_cosine | as cosine with l = <a, b> / ((|a| + theta)(|b| + theta)), 0.1;    | none   | LibMoE v1.1 moe_perturbed.py (PertCos-R);    |
|                  | libmoe = PertCos-R exactly; xmoe = that score in the xmoe variant |        | xmoe: our combination of the two files       |
| hyper            | [W | b] = frozen_hypernet(e), e trainable; top-k of Wx + b;       | none   | LibMoE v1.1 hyperrouter.py; HyperRouter      |
|                  | softmax over the k; k = round((k - k_min) step/total) + k_min     |        | custom_gate.py, new_utils.py                 |
| deepseek         | s = sigmoid(Wx); ids = top-k(s + b), group-limited; renorm(s[ids])| none   | HF DeepseekV3MoE; DeepSeek-V3 model.py Gate  |
| tcmoe            | softmax(Wx + [0, -1, -10]) over 2E + k slots (+e, -e, null); top-k| Wx     | TC-MoE modeling_tcmoe.py; LibMoE moe_tcmoe.py|
|                  | w = p / (selected non-null p + all null p); sign +1 / -1 / 0      |        |                                              |
| moepp            | l = Wx + W_r l_prev (gating residual: the previous MoE layer's l);| none   | MoE++ moe_plus_plus_layer.py (Router);       |
|                  | softmax over E FFN + zero, copy, constant experts; top-k; renorm  |        | LibMoE moe_plus_plus.py (selection)          |
| remoe            | w = ReLU(Wx), every expert with w > 0 (no top-k, no renorm);      | none   | ReMoE megatron/core/transformer/moe/         |
|                  | + lambda E sum_e (c_e / Tk) mean_t w_te; lambda *= or /= 1.2 per  |        | router.py ReLURouter, moe_utils.py,          |
|                  | step toward sparsity 1 - k/E                                      |        | training/training.py (thu-ml/ReMoE)          |
| topp             | p = softmax(Wx); experts by decreasing p until the cumulative p   | none   | Dynamic_MoE modeling/modeling_moe.py         |
|                  | exceeds 0.4 (that expert included), at most topp_max; w = p;      |        | top_p_sampling_batched_all_sequence          |
|                  | + the paper's dynamic loss 1e-4 * mean_t H(p_t)                   |        | (ZhenweiAn/Dynamic_MoE); the loss: the paper |
| expert_choice    | p = softmax(Wx); each expert takes its top C = cf T k / E tokens  | none   | Zhou et al. 2022 (the paper's pseudo-code;   |
|                  | of the batch, w = p (not causal); eval: each token's top-k of p   |        | no official code)                            |

Options of a router are class attributes (`options`) and become config keys: cosine_variant ('xmoe' default,
'libmoe'), router_dim, router_temperature (xmoe only), cosine_theta; hyper_k_schedule, hyper_k_min;
moepp_gate_residual, moepp_tau; n_group, topk_group, bias_update_rate; null_reward; router_jitter; remoe_l1_init,
remoe_l1_alpha; topp_threshold, topp_max, topp_entropy_coef; ec_capacity_factor.

The routing contract (Routing): ids and weights (T, K). K = top_k for a top-k router; a router that gives a token a
variable number of experts (remoe, topp) or that selects per expert (expert_choice) uses K = its most experts per token
(E, or topp_max) and fills the slots a token does not use with UNUSED (-1) and weight 0, after its used slots, slot 0
being the first choice. Dispatch sorts UNUSED slots with the cheap ids, after the FFN assignments, and cuts them off
(they cost one sort key each, no FFN, no bincount entry); the balance loss, the load and experts-per-token statistics,
EP, capacity and Drop-Top-1 never count them. Capacity uses k = top_k (the target mean for variable routers).
Cost of the padding: MoE.routed fwd+bwd, T=4096, d=512, h=1024, E=8, fp32, 2 threads of this 2-core AMD EPYC (shared
with other jobs, noisy): the same 2 FFN assignments per token as K=2, or as K=8 with 6 UNUSED slots: 4.87 s vs 4.89 s
(first runs 5.2 s vs 3.7 s): the FFN dominates; the extra sort keys do not show.

Any router combines with: shared experts (n_shared_experts, always on, DeepSeekMoE / LibMoE SharedE),
a free expert hidden size (expert_hidden, fine-grained experts), routed_scale / shared_scale
(DeepSeek-V3: 2.5 / 1; LibMoE's upcycling mix: 0.5 / 0.5), and a capacity factor; and with:
| option                  | what                                                             | source file (checked against)           |
|-------------------------|------------------------------------------------------------------|-----------------------------------------|
| balance_scope='global'  | balance loss with f_e from the counts of the step's micro-batches| Megatron-LM megatron/core/transformer/  |
|                         | so far summed over balance_group's ranks, P_e local; reset after | moe/router.py _apply_global_aux_loss,   |
|                         | each optimizer step (Qiu et al. 2025, arXiv 2501.11873; Qwen3)    | moe_utils.py switch_load_balancing_..   |
| balance_scope='sequence'| per sequence, averaged (DeepSeek-V3; = balance_per_sequence)      | DeepSeek-V3 paper; Megatron seq_aux_loss|
| force_balance           | ids = arange(T k).view(T, k) % E, w = probs at those ids          | torchtitan TokenChoiceTopKRouter.       |
|                         | (benchmarking: speed apart from what the router learned)          | _debug_force_load_balance_routing       |
| shared_gate             | shared output * sigmoid(w . x) (Qwen2-MoE)                        | HF Qwen2MoeSparseMoeBlock               |

What the sources do, and where this file follows or leaves them (read for issue 10):
- Cosine. X-MoE's own release (torchscale component/xmoe/routing.py) projects to 16 dims (orthogonal init,
  gain 0.32), holds the expert embeddings at norm 1.5, then normalises them again and leaves the input
  unnormalised (`# mat1 = F.normalize(...)` is commented out), has no temperature and no z-loss, and routes
  with GShard's top-2 (random second expert, capacity). LibMoE v2 xmoe.py (the X-MoE LibMoE benchmarked, and
  the 'xmoe' variant here) normalises the input instead, keeps M at norm 1.5 unnormalised, divides by 0.3 and
  takes a softmax over the top-k probabilities. LibMoE v1.1's Cosine-R / PertCos-R ('libmoe') are full-dim
  cosines without temperature, so p is nearly uniform, with the gate's bias added to the probabilities before
  top-k. moe_cosinegating.py assigns combine_loss's tuple to its aux loss (a bug); LibMoE computes a z-loss on
  the bounded cosine logits, which this file does not (|l| <= 1.5: it cannot blow up, it only pulls every
  cosine down). xmoe.py's _make_finite (replace non-finite scores) is omitted: F.normalize's eps keeps l finite.
- HyperRouter. new_utils.calculate_gate_number('linear_increase') and LibMoE's set_num_current_selected both
  use round(n * step / total) + k_min with Python's round (half to even). With LibMoE's topk_min = 1,
  topk_max = 2 that is k = 1 until past half of training, and a softmax over one value is the constant 1: the
  router gets no gradient from the loss while k = 1, and configs/hyper.py (LibMoE: no aux loss) gives it none
  either. That is the sources' behaviour and the default here; hyper_k_min = 2 (HyperRouter's own scripts
  use 8 -> 16 of 16) or hyper_k_schedule = False gives the router a gradient from the first step. LibMoE
  swaps the generated weights into its gate only in training forwards (eval reuses the last ones); here they
  are generated at every forward, which is the same function of e.
- router_dim defaults to E/2 as xmoe.py, but at least 2 (xmoe.py's int(E/2) gives a 1-dim space at E = 2).
- TC-MoE. The official modeling_tcmoe.py computes `* -1.0` for a negative expert and then overwrites that
  line with the unsigned one (negative slots are added there); LibMoE's moe_tcmoe.py subtracts them, as the
  overwritten line intends and as here. The number of null slots is k (LibMoE; the official config's num_null_experts defaults to 2). The
  balance loss counts non-null assignments only (LibMoE); LibMoE has no factor E and sums f counted over the
  whole batch into every sequence's row; here it is the shared normalisation. Null reward: training only.
  The z-loss is on the gate's raw logits, before the -1 / -10 offsets (LibMoE).
- MoE++. Gating residual (moe_plus_plus_layer.py Router): logits += gate_map(previous layer's logits), the
  previous logits after their own residual, not detached; the first MoE layer has none. Heterogeneous balance
  loss (Jin et al. 2024, from the paper: the released code is inference only): L = sum_e eta_e f_e P_e, eta = 1 for FFN experts and tau for the zero-computation
  experts (tau = 0.75 here, moepp_tau = 1 = homogeneous), times n as every balance loss here. LibMoE's
  moe_plus_plus.py multiplies the term of hard-coded expert 4 by 1.3 (its comment says 0.75) and uses top-1.
  The official MoE++ code differs in ways not taken here: a two-layer gate (Linear, tanh, Linear), 2 constant
  experts, the zero expert's gate set to 0 before the renorm (the other expert then gets weight 1), and the
  expert input multiplied by k; LibMoE keeps a one-layer gate and renormalises over the k, as here.
- z-loss: only where the router's source has one (table above); DeepSeek-V3, HyperRouter and MoE++ have
  none, the Switch Transformer has none (it came with ST-MoE), and cosines are bounded.
- Drop-Top-1 (eval.py, drop_top1 below): each token's first choice is removed and the others keep their
  signs, scaled to the total |w| of the k slots (for weights >= 0 that is LibMoE's renormalisation to the same
  total); a token left with only a null slot gets no routed output. Margin: |w|_(1) - |w|_(2), the two largest
  magnitudes (w1 - w2 for weights >= 0, LibMoE's router_magine), plus the share of negative weights.

What the sources of issue 11's methods do, and where this file follows them:
- Global balance. Megatron's _apply_global_aux_loss all-reduces tokens_per_expert over the data-parallel group,
  adds it to global_tokens_per_expert, counts ga_steps, and uses global_tokens_per_expert / ga_steps with the
  local probabilities; finalize_model_grads resets both after the step. So micro-batch m sees the counts of
  micro-batches 1..m, not of later ones (they are not known yet). Here: the same counts, as shares of the
  assignments (identical for top-k; defined for variable-count routers); only in training steps (grad enabled),
  else the micro-batch's own. Under DDP every rank's loss uses the same f and its own P, and DDP's mean of the
  gradients is the gradient of E sum f mean_r P_r: the whole batch's (tests/ep_worker.py checks it).
- ReMoE. The released router applies the L1 penalty through Megatron's switch_load_balancing_loss_func on the
  ReLU outputs (the "load-balanced" L1 of the paper), with topk in f's denominator, in training only. The
  coefficient is one model-wide buffer, lambda_0 = 1e-8, updated once per step with the sparsity averaged over
  layers, micro-batches and data-parallel ranks: *1.2 below the target 1 - k/E, else /1.2. ReMoE's scripts also
  set an aux-loss coefficient, but the ReLU router never computes it: configs/remoe.py sets aux_loss_coef = 0.
  The balance probabilities returned here are softmax(Wx), used only if aux_loss_coef > 0.
- Top-p. The released code (inference only) keeps the sorted experts with cumsum <= p and the first with cumsum > p,
  marks the others -1 with weight 0 (this contract's UNUSED) and takes the raw probabilities as weights (no renorm).
  The maximum per token (topp_max) and the dynamic loss H(p) with coefficient 1e-4 are the paper's; the paper's
  balance loss (1e-2) is the shared one, f as shares of the variable number of assignments.
- Expert choice. The paper routes over the whole batch: T = the micro-batch's B * S tokens, C = ceil(cf T k / E)
  (cf k is the paper's c). Training is therefore not causal. Eval (model.eval(): validation loss, eval.py, sample)
  uses each token's own top-k of p with weights p: causal, and the same weights' scale as in training.
- Forced balance. Megatron replaces the logits by random normals (straight-through gradient); torchtitan assigns
  round robin and gathers the router's scores there. Here torchtitan's rule (exactly balanced, deterministic) for
  every router, with the balance-loss probabilities as the gathered scores, k = top_k slots.

Choices and the numbers behind them:
- Aux losses are computed from what the router returns, for any router. Balance (Switch / Megatron
  normalisation): L = n * sum_e eta_e f_e P_e with f_e the share of the assignments to the n experts that went
  to e (ids >= n, tcmoe's null slots, are not assignments), P_e the mean balance probability and eta = 1 unless
  the router gives one (MoE++); perfect balance gives exactly 1 (Hugging Face Mixtral reports k times
  this). balance_per_sequence computes it per sequence and averages (DeepSeek-V3). z-loss (ST-MoE):
  mean_t logsumexp(l_t)^2. Both are averaged over the MoE layers, so a coefficient means the same at any depth.
- Dispatch is sort-based and dropless: the T*K slots are flattened slot-major and stable-sorted by expert id
  (cheap ids and UNUSED slots last, then cut off), the tokens gathered with one index_select, each expert runs
  on its contiguous rows, and the outputs go back to their tokens with index_add_. No [T, E, capacity] one-hot
  (nanoMoE's costs O(T^2)). Slot-major order means that with a capacity factor every token's first choice is
  seated before any second choice (GShard); over a whole batch, so dropping with k >= 2 is not causal.
- Cheap experts (tcmoe's null slots, MoE++'s zero / copy / constant experts) are ids >= E: the sort puts
  them after the FFN assignments, they cost no FFN, and the router adds their output (cheap_output).
- The combine weight multiplies each row's hidden activation, not its output ((a w) W2 = (a W2) w): the
  hidden width is <= d in fine-grained experts (E=64, h=128, d=512: 4x fewer multiplies). Under expert
  parallelism the weights travel with the tokens (one more all_to_all of N floats).
- Experts are stacked [E, out, in] tensors (one set of names for both flavours, the layout of transformers 5's
  Mixtral) run one of two ways, the same math (tests/test_moe.py checks both against a naive loop):
  expert_impl='grouped', one F.grouped_mm per weight matrix over all rows (torchtitan's and Megatron's path on
  GPUs), or 'loop', one F.linear per expert on unbind(0) views (indexing c_fc[e] per expert would make
  autograd build E full-size gradient buffers) whose outputs are added straight into their tokens' rows (no
  torch.cat of the k*T*d outputs: at E=64, k=8, T=4096, d=512 a 36 ms copy on one thread of the CPU below,
  whose dense MLP takes about 580 ms forward + backward there). 'auto' = grouped on CUDA GPUs of compute capability >= 8.0 (not measured here: no
  GPU was available), the loop on CPUs: torch 2.13's CPU grouped_mm is itself a loop of matmuls and was
  slower (bench.py, below: 1.13x vs 0.96x dense at E=8, 1.76x vs 1.56x at E=64). grouped_mm runs eagerly
  inside torch.compile (its meta kernel takes bf16 only).
- bench.py --dtype=float32, T=4096, d=512, forward + backward, 2 threads of a 2-core AMD EPYC (AVX-512 BF16),
  torch 2.13, one run of the layer section on a quiet machine: against a dense SwiGLU MLP with the same active
  FLOPs this layer takes 0.96x at E=8, k=2, h=1024 (target <= 1.15) and 1.56x at E=64, k=8, h=128 (target
  <= 1.6); transformers' MixtralSparseMoeBlock (eager experts) takes 1.26x and 2.64x this layer's time (its
  grouped_mm experts: 1.17x and 1.62x). Where the session began, the same layer took 0.98x and 2.73x: the
  gain at E=64 is the index_add_ combine (no (k*T, d) index_copy_ buffer, zero fill and sum over k) and the
  loop's direct accumulation. A training step of a 4-layer GPT (8 x 256 tokens, forced balance, fused AdamW)
  runs at 0.97x (E=8) and 0.79x (E=64) the tokens/s of the dense GPT with the same active parameters: at E=64
  what remains is the per-expert matmuls' lower efficiency (matmuls 66% of the step on one thread) and the
  copies that stack 64 per-expert weight gradients and the SwiGLU halves (torch.cat, 7.6% of the step).
- Peak memory of the layer's forward + backward (bench.py, a fresh process per layer, peak resident set above
  the set-up): 227 MB at E=8 and 266 MB at E=64 against 808 MB for a dense MLP with the same total parameters.
- torch.compile of the layer (same machine, busier): 0.99x eager at E=8 and 1.11x at E=64 after 16-17 s of
  compiling; the dispatch's data-dependent sizes (bincount, the host sync) split it into several graphs and
  the expert matmuls are what costs, so compile does not pay on a CPU.
- Expert parallelism: each rank of an EP group holds E/ep_size experts; per layer, counts travel with an
  equal-split all_to_all_single, tokens with an uneven one inside an autograd Function whose backward is
  the same exchange with the splits swapped (Megatron's _AllToAll), then they are regrouped by local expert.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

# -----------------------------------------------------------------------------
# routers

UNUSED = -1  # the id of an unused slot (weight 0): a token of a variable-count router that takes fewer than K experts


@dataclass
class Routing:
    """The contract between a router and the layer. K slots per token: K = top_k for a top-k router, the router's
    most experts per token for the others (ReMoE, top-p, expert choice: a variable number per token). Slot 0 is the
    token's first choice, the others follow by weight; a slot a token does not use holds UNUSED (-1) with weight 0,
    after its used slots. Ids >= E are cheap experts (no FFN). Dispatch, capacity, EP, the aux losses, statistics,
    Drop-Top-1 and eval.py's analysis read these two tensors only, and never count an UNUSED slot."""
    ids: torch.Tensor      # (T, K) expert ids; ids >= E are cheap experts (no FFN); UNUSED (-1) = no expert
    weights: torch.Tensor  # (T, K) combine weights (signed for tcmoe; 0 in UNUSED slots)
    probs: torch.Tensor    # (T, n) probabilities for the balance loss
    logits: torch.Tensor | None  # (T, n) logits for the z-loss; None where the router's source has no z-loss
    loss: torch.Tensor | float = 0.0  # router-specific loss, already weighted (tcmoe's null reward)
    balance_weight: torch.Tensor | None = None  # (n,) factor of each expert's term in the balance loss (MoE++'s tau)
    state: torch.Tensor | None = None  # handed to the next MoE layer's router as `prev` (MoE++'s gating residual)


def renorm(w):
    return w / (w.sum(-1, keepdim=True) + 1e-20)


class Router(nn.Module):
    """Base class. A router maps x (T, d) float32, and prev (the previous MoE layer's Routing.state, None in the
    first MoE layer), to a Routing. `options` lists its own config keys and their defaults; train.py and GPTConfig
    pick them up from here, so a new router touches only this file."""
    options = {}  # its architecture settings and their defaults (fixed by a checkpoint)
    knobs = {}  # its training knobs and their defaults (a run from a checkpoint may change them)

    @classmethod
    def settings(cls):
        return {**cls.options, **cls.knobs}

    def __init__(self, config):
        super().__init__()
        self.n_experts, self.top_k, self.renorm = config.n_experts, config.top_k, config.router_renorm
        self.progress = 1.0  # fraction of training done, set by train.py (hyper's k schedule reads it)

    def select(self, p):
        """top-k of p (T, n) -> weights, ids, renormalised if configured"""
        w, ids = p.topk(self.top_k, dim=-1)  # (T, k)
        return (renorm(w) if self.renorm else w), ids


class SoftmaxRouter(Router):
    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        p = logits.softmax(-1)
        w, ids = self.select(p)
        return Routing(ids, w, p, logits)


class SwitchRouter(Router):
    knobs = dict(router_jitter=0.01)  # multiplicative input jitter of the switch router during training

    def __init__(self, config):
        super().__init__(config)
        if config.top_k != 1:
            raise ValueError(f"router 'switch' routes each token to one expert: set top_k=1 (got {config.top_k})")
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.jitter = config.router_options['router_jitter']

    def forward(self, x, prev=None):
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = self.gate(x)
        p = logits.softmax(-1)
        w, ids = p.max(-1, keepdim=True)  # (T, 1)
        return Routing(ids, w, p, None)  # the Switch Transformer has no z-loss (it came with ST-MoE)


class SigmoidRouter(Router):
    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)

    def forward(self, x, prev=None):
        logits = self.gate(x)
        s = logits.sigmoid()
        w, ids = self.select(s)
        return Routing(ids, w, s / s.sum(-1, keepdim=True), logits)


class CosineRouter(Router):
    """cosine_variant 'xmoe' (LibMoE v2 xmoe.py): r = Px in router_dim dims, expert embeddings M held at norm 1.5,
    l = <r/|r|, M_e>, p = softmax(l / tau), top-k of p, weights = softmax of the k values of p.
    'libmoe' (LibMoE v1.1 moe_cosinegating.py, the benchmarked Cosine-R): gate Linear(d, E) with bias b,
    l = <x, W_e> / (|x| |W_e|) in full dimension, no temperature, p = softmax(l), top-k of p + b, weights =
    softmax of the k values of p + b. No z-loss in either (the logits are bounded cosines)."""
    options = dict(cosine_variant='xmoe',  # 'xmoe' (projected, tau, M at norm 1.5) or 'libmoe' (LibMoE v1.1 Cosine-R / PertCos-R)
                   router_dim=0, router_temperature=0.3)  # xmoe: routing space (0 = E/2, as LibMoE) and tau

    def __init__(self, config):
        super().__init__(config)
        o, d, E = config.router_options, config.n_embd, config.n_experts
        self.variant = o['cosine_variant']
        if self.variant not in ('xmoe', 'libmoe'):
            raise ValueError(f"cosine_variant={self.variant!r}: use 'xmoe' or 'libmoe'")
        if self.variant == 'xmoe':
            dim = o['router_dim'] or max(E // 2, 2)
            self.tau = o['router_temperature']
            self.gate = nn.Linear(d, dim, bias=False)  # P: d -> router_dim
            self.expert_emb = nn.Parameter(torch.randn(E, dim))  # M, rescaled to norm 1.5 at each forward
        else:
            self.gate = nn.Linear(d, E, bias=True)  # rows W_e; the bias is added to the probabilities

    def scores(self, a, b):
        """(T, n) x (E, n) -> (T, E); xmoe: b's rows are held at norm 1.5 and only a is normalised"""
        if self.variant == 'xmoe':
            return F.normalize(a, dim=-1, eps=1e-4) @ b.t()
        return (a @ b.t()) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1))

    def forward(self, x, prev=None):
        if self.variant == 'xmoe':
            with torch.no_grad():  # X-MoE: the expert embeddings are set back to norm 1.5 in place, outside autograd
                self.expert_emb.mul_(1.5 / self.expert_emb.norm(dim=-1, keepdim=True))
            logits = self.scores(self.gate(x), self.expert_emb)  # (T, E)
            p = (logits / self.tau).softmax(-1)
            v, ids = p.topk(self.top_k, dim=-1)
        else:
            logits = self.scores(x, self.gate.weight)  # (T, E)
            p = logits.softmax(-1)
            v, ids = (p + self.gate.bias).topk(self.top_k, dim=-1)  # the bias shifts the probabilities
        return Routing(ids, v.softmax(-1), p, None)  # a softmax over the k selected values


class PerturbedCosineRouter(CosineRouter):
    """the cosine's norms each get + theta (LibMoE v1.1 moe_perturbed.py): l = <a, b> / ((|a| + theta)(|b| + theta));
    'libmoe' is LibMoE's PertCos-R exactly; 'xmoe' puts this score into the xmoe variant (a = Px, b = M at norm 1.5)"""
    options = dict(CosineRouter.options, cosine_theta=0.1)  # theta added to both norms

    def __init__(self, config):
        super().__init__(config)
        self.theta = config.router_options['cosine_theta']

    def scores(self, a, b):
        return (a @ b.t()) / ((a.norm(dim=-1, keepdim=True) + self.theta) * (b.norm(dim=-1) + self.theta))


class HyperRouter(Router):
    knobs = dict(hyper_k_schedule=True,  # k grows from hyper_k_min to top_k over training, as HyperRouter / LibMoE
                 hyper_k_min=1)  # the schedule's first k (1 as LibMoE; >= 2 gives the router a gradient from the start)

    def __init__(self, config):
        super().__init__(config)
        d, E = config.n_embd, config.n_experts
        self.embedding = nn.Parameter(torch.randn(d))  # trainable e
        self.hypernet = nn.Sequential(nn.Linear(d, d // 4), nn.ReLU(), nn.Linear(d // 4, E * (d + 1)))
        self.hypernet.requires_grad_(False)  # frozen random hypernetwork
        self.k_schedule, self.k_min = config.router_options['hyper_k_schedule'], config.router_options['hyper_k_min']
        if self.k_schedule and not 1 <= self.k_min <= self.top_k:
            raise ValueError(f"hyper_k_min={self.k_min} must be between 1 and top_k={self.top_k}")

    def current_k(self):
        """HyperRouter's linear_increase / LibMoE's set_num_current_selected: round((k - k_min) * step / total) + k_min,
        Python's round (half to even): with k_min = 1, top_k = 2, k = 1 until past half of training"""
        if not (self.training and self.k_schedule):
            return self.top_k
        return round((self.top_k - self.k_min) * self.progress) + self.k_min

    def forward(self, x, prev=None):
        E, d = self.n_experts, x.shape[-1]
        wb = self.hypernet(self.embedding).view(E, d + 1)  # router weight and bias, made from e
        logits = F.linear(x, wb[:, :d], wb[:, d])  # (T, E)
        top, ids = logits.topk(self.current_k(), dim=-1)
        return Routing(ids, top.softmax(-1), logits.softmax(-1), None)  # HyperRouter and LibMoE: no aux loss


class DeepSeekRouter(Router):
    options = dict(n_group=1, topk_group=1)  # group-limited top-k
    knobs = dict(bias_update_rate=1e-3)  # the bias step u

    def __init__(self, config):
        super().__init__(config)
        o, E = config.router_options, config.n_experts
        self.n_group, self.topk_group, self.rate = o['n_group'], o['topk_group'], o['bias_update_rate']
        if E % self.n_group or self.topk_group > self.n_group or self.topk_group * E // self.n_group < self.top_k:
            raise ValueError(f"deepseek: n_group={self.n_group} must divide n_experts={E} and its top "
                             f"topk_group={self.topk_group} groups must hold at least top_k={self.top_k} experts")
        self.gate = nn.Linear(config.n_embd, E, bias=False)
        self.register_buffer('expert_bias', torch.zeros(E))  # b: steers selection only, no gradient

    def forward(self, x, prev=None):
        logits = self.gate(x)
        s = logits.sigmoid()  # (T, E)
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
        return Routing(ids, renorm(w) if self.renorm else w, s / s.sum(-1, keepdim=True), None)  # V3: no z-loss

    @torch.no_grad()
    def update_bias(self, counts):
        """after each optimizer step, from the token counts per expert summed over all ranks"""
        self.expert_bias += self.rate * torch.sign(counts.mean() - counts)


class TCMoERouter(Router):
    knobs = dict(null_reward=1e-5)  # reward for routing to a null slot (skipping compute)

    def __init__(self, config):
        super().__init__(config)
        E, k = config.n_experts, config.top_k
        self.gate = nn.Linear(config.n_embd, 2 * E + k, bias=False)  # positive, negative and null slots
        self.register_buffer('offset', torch.cat([torch.zeros(E), -torch.ones(E), -10 * torch.ones(k)]), persistent=False)
        self.reward = config.router_options['null_reward']

    def forward(self, x, prev=None):
        E = self.n_experts
        logits = self.gate(x)  # (T, 2E+k), the z-loss's logits (before the offsets, as LibMoE)
        p = (logits + self.offset).softmax(-1)
        v, idx = p.topk(self.top_k, dim=-1)  # (T, k)
        null_mass = p[:, 2 * E:].sum(-1)  # (T,) every null slot counts as active
        w = v / ((v * (idx < 2 * E)).sum(-1, keepdim=True) + null_mass[:, None])  # selected non-null + all null
        sign = torch.where(idx < E, 1.0, torch.where(idx < 2 * E, -1.0, 0.0))
        ids = torch.where(idx < 2 * E, idx % E, E)  # null slots -> cheap id E, no output
        pe = p[:, :E] + p[:, E:2 * E]  # (T, E) probability of each base expert
        reward = -self.reward * null_mass.mean() if self.training else 0.0
        return Routing(ids, w * sign, pe / pe.sum(-1, keepdim=True), logits, reward)


class MoEPPRouter(Router):
    options = dict(moepp_gate_residual=True)  # MoE++ gating residual: logits + W_r (previous MoE layer's logits)
    knobs = dict(moepp_tau=0.75)  # balance-loss factor of the zero / copy / constant experts (1 = homogeneous)

    def __init__(self, config):
        super().__init__(config)
        d, n = config.n_embd, config.n_experts + 3
        o = config.router_options
        self.gate = nn.Linear(d, n, bias=False)  # E FFN experts, zero, copy, constant
        self.residual = nn.Linear(n, n, bias=False) if o['moepp_gate_residual'] else None  # MoE++'s gate_map
        self.const_gate = nn.Linear(d, 2, bias=False)
        self.const = nn.Parameter(0.002 * torch.randn(d))  # the constant expert's vector c
        eta = torch.ones(n)
        eta[config.n_experts:] = o['moepp_tau']
        self.register_buffer('eta', eta, persistent=False)

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E+3)
        if self.residual is not None and prev is not None:
            logits = logits + self.residual(prev)  # the previous MoE layer's logits (after its own residual)
        p = logits.softmax(-1)
        w, ids = self.select(p)
        return Routing(ids, w, p, None, balance_weight=self.eta, state=logits)  # MoE++: no z-loss

    def cheap_output(self, x, ids, w):
        """zero expert: 0; copy expert: x; constant expert: a0 x + a1 c with a = softmax(W_c x)"""
        E = self.n_experts
        copy_w = (w * (ids == E + 1)).sum(-1, keepdim=True)  # (T, 1)
        const_w = (w * (ids == E + 2)).sum(-1, keepdim=True)
        a = self.const_gate(x).softmax(-1)  # (T, 2)
        return copy_w * x + const_w * (a[:, :1] * x + a[:, 1:] * self.const)


class ReMoERouter(Router):
    """ReMoE (Wang et al., ICLR 2025): weights = ReLU(Wx), every expert whose weight is positive (no top-k, no renorm),
    slots ordered by weight; training adds a load-balanced L1 penalty (ReMoE router.py apply_l1_reg, Megatron's
    switch_load_balancing_loss_func on the ReLU outputs): lambda * E * sum_e (c_e / (T k)) * mean_t ReLU(Wx)_te,
    c_e = tokens with a positive weight for e. lambda is one value for the whole model, adapted after each optimizer
    step by end_step: times alpha while the step's sparsity (zero weights / (T E), over the layers,
    micro-batches and ranks) is below the target 1 - k/E, else divided by alpha (ReMoE training.py)."""
    knobs = dict(remoe_l1_init=1e-8,  # lambda_0, the L1 coefficient at the start (ReMoE: 1e-8)
                 remoe_l1_alpha=1.2)  # lambda's multiplicative step toward sparsity 1 - top_k/E (ReMoE: 1.2)

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.alpha = config.router_options['remoe_l1_alpha']
        self.register_buffer('l1_coef', torch.tensor(float(config.router_options['remoe_l1_init'])))  # lambda; in checkpoints

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        g = F.relu(logits)
        w, ids = g.sort(-1, descending=True)  # (T, E) every expert, largest weight first
        ids = ids.masked_fill(w == 0, UNUSED)
        loss = 0.0
        if self.training and torch.is_grad_enabled():
            f = (g > 0).sum(0) / (g.shape[0] * self.top_k)  # (E,) c_e / (T k)
            loss = self.l1_coef * self.n_experts * (f * g.mean(0)).sum()
        return Routing(ids, w, logits.softmax(-1), None, loss)  # ReMoE: no z-loss; probs only if aux_loss_coef > 0

    @torch.no_grad()
    def update_coefficient(self, sparsity):
        """after each optimizer step, from that step's sparsity (ReMoE training.py)"""
        target = 1 - self.top_k / self.n_experts
        self.l1_coef *= self.alpha if sparsity < target else 1 / self.alpha


class TopPRouter(Router):
    """Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts"; Dynamic_MoE modeling_moe.py
    top_p_sampling_batched_all_sequence): p = softmax(Wx), experts in order of p until their cumulative p exceeds
    the threshold (the expert that crosses it included), at most topp_max; weights = p (no renorm, as the source).
    Training adds the paper's dynamic loss, topp_entropy_coef * mean_t (-sum_e p log p)."""
    knobs = dict(topp_threshold=0.4,  # cumulative probability at which a token stops taking experts (paper: 0.4)
                 topp_max=0,  # most experts per token (0 = n_experts)
                 topp_entropy_coef=1e-4)  # weight of the dynamic (entropy) loss (paper: 1e-4)

    def __init__(self, config):
        super().__init__(config)
        o = config.router_options
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.threshold, self.entropy_coef = o['topp_threshold'], o['topp_entropy_coef']
        self.max = o['topp_max'] or config.n_experts
        if not 1 <= self.max <= config.n_experts:
            raise ValueError(f"topp_max={o['topp_max']} must be between 1 and n_experts={config.n_experts} (0 = all)")

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        p = logits.softmax(-1)
        v, ids = p.sort(-1, descending=True)  # (T, E)
        over = v.cumsum(-1) > self.threshold  # (T, E)
        crossing = F.one_hot(over.long().argmax(-1), v.shape[1]).bool()  # the expert whose p crosses the threshold
        keep = (~over | crossing)[:, :self.max]  # (T, K)
        w, ids = v[:, :self.max] * keep, ids[:, :self.max].masked_fill(~keep, UNUSED)
        loss = 0.0
        if self.training:
            loss = self.entropy_coef * -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
        return Routing(ids, w, p, None, loss)  # the paper: balance and dynamic losses, no z-loss


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): p = softmax(Wx) per token; in training each expert takes the C tokens of the
    batch with the largest p (C = ceil(ec_capacity_factor * T * k / E)), weight p; a token gets 0 to E experts. This
    looks at every token of the batch, later ones too: not causal. In eval (model.eval(): validation, eval.py,
    generation) the causal rule: each token takes the top-k of its own p, weights p (token choice, no renorm)."""
    knobs = dict(ec_capacity_factor=1.0)  # C = ec_capacity_factor * T * top_k / E tokens per expert (paper's c = cf * k)

    def __init__(self, config):
        super().__init__(config)
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.capacity_factor = config.router_options['ec_capacity_factor']

    def forward(self, x, prev=None):
        logits = self.gate(x)  # (T, E)
        p = logits.softmax(-1)
        if not self.training:  # the causal rule: no token sees another
            w, ids = p.topk(self.top_k, dim=-1)
            return Routing(ids, w, p, None)
        T = p.shape[0]
        C = min(T, math.ceil(self.capacity_factor * T * self.top_k / self.n_experts))
        g, tok = p.topk(C, dim=0)  # (C, E) each expert's C tokens and their gates
        chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(0, tok, True)  # (T, E)
        gate = torch.zeros_like(p).scatter(0, tok, g)  # (T, E) p where chosen, else 0
        w, ids = gate.masked_fill(~chosen, -1.0).sort(-1, descending=True)  # per token, its experts first
        ids = ids.masked_fill(w < 0, UNUSED)
        return Routing(ids, w.clamp_min(0), p, None)  # the paper: no balance loss, no z-loss


ROUTERS = {
    'softmax': SoftmaxRouter,
    'switch': SwitchRouter,
    'sigmoid': SigmoidRouter,
    'cosine': CosineRouter,
    'perturbed_cosine': PerturbedCosineRouter,
    'hyper': HyperRouter,
    'deepseek': DeepSeekRouter,
    'tcmoe': TCMoERouter,
    'moepp': MoEPPRouter,
    'remoe': ReMoERouter,
    'topp': TopPRouter,
    'expert_choice': ExpertChoiceRouter,
}


def router_settings():
    """every registered router's own settings (options and knobs) with their defaults (read when asked: routers
    registered later count too)"""
    return {k: v for cls in ROUTERS.values() for k, v in cls.settings().items()}


def router_knobs():
    """every registered router's training knobs with their defaults"""
    return {k: v for cls in ROUTERS.values() for k, v in cls.knobs.items()}

# -----------------------------------------------------------------------------
# aux losses

def assignment_counts(ids, n, n_seq=1):
    """ids (T, K) -> (n_seq, n) assignments per expert in each of n_seq equal runs of tokens (sequences); UNUSED slots
    and ids >= n (cheap experts outside the balance loss, tcmoe's null slots) are not assignments"""
    idx = torch.where(ids < 0, n, ids.clamp(max=n)).view(n_seq, -1)  # (n_seq, T/n_seq * K); n = not counted
    counts = torch.zeros(n_seq, n + 1, device=ids.device).scatter_add_(1, idx, torch.ones(idx.shape, device=ids.device))
    return counts[:, :n]


def balance_loss(probs, ids, n_seq=1, weight=None, counts=None):
    """n * sum_e eta_e f_e P_e per sequence, averaged; probs (T, n), ids (T, K); f_e = share of the assignments to
    the n experts that went to e (ids >= n, tcmoe's null slots, and UNUSED slots are not assignments: LibMoE counts
    non-null only; a variable-count router's shares are of its assignments, so perfect balance is 1 for it too);
    eta = weight (n,), 1 by default (MoE++: tau for its zero / copy / constant experts). counts (n,): f from these
    assignment counts instead of from ids (balance_scope='global': the step's counts over every rank)"""
    T, n = probs.shape
    c = assignment_counts(ids, n, n_seq) if counts is None else counts[None]  # (B, n)
    f = c / c.sum(-1, keepdim=True).clamp_min(1)  # (B, n) share of the assignments
    P = probs.view(n_seq, -1, n).mean(1)  # (B, n) mean probability
    return n * (f * P * (1 if weight is None else weight)).sum(-1).mean()


def z_loss(logits):
    return torch.logsumexp(logits, dim=-1).square().mean()

# -----------------------------------------------------------------------------
# routing statistics (the MoE layer's counters and eval.py's analysis)

def weight_sums(w):
    """sums over the tokens of w (T, k), defined for signed weights (tcmoe) too: the entropy of the top-k weights
    (q = |w| / sum |w|), the router margin |w|_(1) - |w|_(2) (the two largest magnitudes; w1 - w2 for weights >= 0,
    LibMoE's router_magine; |w|_(1) when k = 1), and the number of negative weights (subtracted experts)"""
    a = w.abs()
    q = a / (a.sum(-1, keepdim=True) + 1e-20)  # (T, k)
    top = a.topk(min(2, w.shape[1]), dim=-1).values
    margin = top[:, 0] - top[:, 1] if w.shape[1] > 1 else top[:, 0]
    return -(q * q.clamp_min(1e-20).log()).sum(), margin.sum(), (w < 0).sum().float()


def expert_load(ids, E):
    """assignments per FFN expert (E,) of ids (T, K): cheap ids (>= E) and UNUSED slots (< 0) are not counted"""
    return torch.bincount(torch.where(ids < 0, E, ids.clamp(max=E)).flatten(), minlength=E + 1)[:E]


def drop_top1(ids, w):
    """eval.py's Drop-Top-1: each token loses its first choice (slot 0); the other slots keep their signs and are
    scaled to the total |w| of the k slots (for weights >= 0: the same total weight). A token whose other slots
    carry no weight (a null slot, UNUSED slots of a variable-count router) gets no routed output. (T, K) -> (T, K-1)"""
    rest = w[:, 1:]
    left = rest.abs().sum(-1, keepdim=True)  # (T, 1)
    scale = torch.where(left > 0, w.abs().sum(-1, keepdim=True) / left.clamp_min(1e-20), 0.0)
    return ids[:, 1:], rest * scale


def load_stats(load):
    """assignments per expert (E,) -> the load, its coefficient of variation, max/mean and entropy"""
    share = load / load.sum().clamp_min(1)
    return dict(load=load.tolist(), load_cv=(load.std(correction=0) / load.mean().clamp_min(1e-20)).item(),
                max_over_mean=(load.max() / load.mean().clamp_min(1e-20)).item(),
                load_entropy=-(share * share.clamp_min(1e-20).log()).sum().item())

# -----------------------------------------------------------------------------
# experts and expert parallelism

def activation(h, arch):
    """the MLP nonlinearity of each block flavour: GELU (tanh) for gpt2, SwiGLU for llama (h = [gate, up])"""
    if arch == 'gpt2':
        return F.gelu(h, approximate='tanh')
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def weigh(t, scale):
    """t times each row's combine weight scale (N, 1); None = unweighted (shared experts: no multiply by ones)"""
    return t if scale is None else t * scale


def use_grouped(impl, device, dtype, widths):
    """whether the experts run as grouped matmuls: 'grouped', 'loop', or 'auto' = grouped on CUDA GPUs of compute
    capability 8.0 and up (torchtitan's and Megatron's expert path) where the rows are 16-byte aligned as
    F.grouped_mm needs (widths: the matrices' row lengths), the loop elsewhere: torch 2.13's CPU grouped_mm is a
    loop of matmuls itself and measured slower than ours (see the docstring)"""
    size = torch.finfo(dtype).bits // 8
    aligned = all(n * size % 16 == 0 for n in widths)
    if impl == 'grouped' and not aligned:
        raise ValueError(f"expert_impl='grouped' needs n_embd and expert_hidden to be multiples of {16 // size} in "
                         f"{dtype} (F.grouped_mm's 16-byte rows): use expert_impl='auto' or 'loop'")
    if impl == 'auto':
        return device.type == 'cuda' and torch.cuda.get_device_capability(device) >= (8, 0) and aligned
    return impl == 'grouped'


class Experts(nn.Module):
    """n MLPs in the block's flavour, stacked: c_fc (n, out, d), c_proj (n, d, hidden), biases for gpt2.
    impl: 'grouped' (one F.grouped_mm per matrix over all experts' rows), 'loop' (one F.linear per expert), 'auto'"""

    def __init__(self, config, n, hidden):
        super().__init__()
        d, out = config.n_embd, hidden * (1 if config.arch == 'gpt2' else 2)
        self.arch, self.impl = config.arch, config.expert_impl
        self.c_fc = nn.Parameter(torch.empty(n, out, d))
        self.c_proj = nn.Parameter(torch.empty(n, d, hidden))
        self.b_fc = nn.Parameter(torch.zeros(n, out)) if config.bias else None
        self.b_proj = nn.Parameter(torch.zeros(n, d)) if config.bias else None

    def forward(self, x, counts, scale=None, combine=None):
        """x (N, d) sorted by expert, counts (n,) rows per expert, scale (N,) or None: each row's output weight,
        applied to the hidden activation (hidden <= d in fine-grained experts: the cheapest place) -> the rows'
        outputs (N, d); with combine = (index (N,), T): their sums at each index, (T, d), with no (N, d) copy"""
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        scale = None if scale is None else scale[:, None].to(dt)  # (N, 1); None: unweighted (shared experts)
        index, out = (None, None) if combine is None else (combine[0], x.new_zeros(combine[1], x.shape[1], dtype=dt))
        if use_grouped(self.impl, x.device, dt, self.c_proj.shape[1:]):  # (d, hidden); c_fc's rows are 1 or 2 x hidden
            y = self.grouped(x.to(dt), counts, scale)
            return y if out is None else out.index_add_(0, index, y)
        return self.loop(x, counts.tolist(), scale, index, out)

    @torch.compiler.disable  # eager inside torch.compile: its meta kernel accepts bf16 only (torch 2.13)
    def grouped(self, x, counts, scale):
        dt = x.dtype  # grouped_mm is not autocast-aware: cast as F.linear would be
        offs = counts.cumsum(0).to(torch.int32)  # (n,) end row of each expert
        h = F.grouped_mm(x, self.c_fc.to(dt).transpose(1, 2), offs=offs)  # (N, out)
        if self.b_fc is not None:
            h = h + self.b_fc.to(dt).repeat_interleave(counts, dim=0, output_size=x.shape[0])  # each row's expert bias
        a = weigh(activation(h, self.arch), scale)  # (N, hidden)
        y = F.grouped_mm(a, self.c_proj.to(dt).transpose(1, 2), offs=offs)  # (N, d)
        if self.b_proj is not None:
            y = y + weigh(self.b_proj.to(dt).repeat_interleave(counts, dim=0, output_size=x.shape[0]), scale)
        return y

    def loop(self, x, sizes, scale, index=None, out=None):
        n = len(sizes)
        b_fc = [None] * n if self.b_fc is None else self.b_fc.unbind(0)
        b_proj = [None] * n if self.b_proj is None else self.b_proj.unbind(0)
        index = [None] * n if index is None else index.split(sizes)
        scale = [None] * n if scale is None else scale.split(sizes)
        ys = []
        for xe, se, ie, w1, b1, w2, b2 in zip(x.split(sizes), scale, index, self.c_fc.unbind(0), b_fc,
                                              self.c_proj.unbind(0), b_proj):  # unbind: one gradient copy, not E
            ye = F.linear(weigh(activation(F.linear(xe, w1, b1), self.arch), se), w2)
            ye = ye if b2 is None else ye + weigh(b2, se)
            if out is None:
                ys.append(ye)
            else:  # straight into the tokens' rows: no torch.cat of the N outputs (a k*T*d copy)
                out.index_add_(0, ie, ye.to(out.dtype))
        return torch.cat(ys) if out is None else out


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the same exchange with the splits swapped"""

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

SUMS = ('tokens', 'assignments', 'dropped', 'entropy', 'margin', 'slots', 'negative')  # a layer's statistics counters
# (summed over forwards, all-reduced as one tensor by train.py): used slots are ids >= 0; entropy, margin: weight_sums


class MoE(nn.Module):
    """router -> sort-based dispatch -> experts -> weighted combine (+ cheap experts, + shared experts)"""

    def __init__(self, config, hidden):
        super().__init__()
        if config.router not in ROUTERS:
            raise ValueError(f"unknown router '{config.router}': choose one of {', '.join(ROUTERS)} (or 'dense')")
        if not 1 <= config.top_k <= config.n_experts:
            raise ValueError(f"top_k={config.top_k} must be between 1 and n_experts={config.n_experts}")
        if config.n_experts % config.ep_size:
            raise ValueError(f"n_experts={config.n_experts} is not divisible by ep_size={config.ep_size}: "
                             f"pick an ep_size that divides it")
        self.n_experts, self.capacity_factor = config.n_experts, config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor  # 0 = dropless at eval, as nanoMoE
        self.routed_scale, self.shared_scale = config.routed_scale, config.shared_scale
        self.top_k, self.balance_scope = config.top_k, config.balance_scope  # 'batch', 'sequence' or 'global'
        self.balance_group, self.balance_counts = None, None  # global scope: set_balance_group; counts of this step
        self.force_balance = config.force_balance  # benchmarking: balanced round-robin ids in place of the router's
        self.router = ROUTERS[config.router](config)
        self.ep_size, self.ep_group = config.ep_size, None  # the group is set by set_expert_parallel
        self.experts = Experts(config, config.n_experts // config.ep_size, hidden)
        self.shared = Experts(config, 1, hidden * config.n_shared_experts) if config.n_shared_experts else None
        self.shared_gate = nn.Linear(config.n_embd, 1, bias=False) if config.shared_gate else None  # Qwen2-MoE
        self.drop_top1 = False  # eval.py's Drop-Top-1 analysis
        self.record = None  # a list to collect (ids, weights) per forward, for eval.py's analysis
        for name in ('load', 'step_counts'):  # load: since the last reset_stats; step_counts: since the last bias update
            self.register_buffer(name, torch.zeros(config.n_experts), persistent=False)
        self.register_buffer('step_tokens', torch.zeros(()), persistent=False)  # tokens since the last step (ReMoE)
        self.register_buffer('sums', torch.zeros(len(SUMS)), persistent=False)  # running sums of SUMS, in that order

    def forward(self, x, prev=None):
        """x (B, S, d), prev: the previous MoE layer's aux['state'] (None in the first) -> y, aux: the unweighted
        balance and z-losses, the router's own weighted loss, and `state` for the next MoE layer's router"""
        B, S, d = x.shape
        x = x.reshape(-1, d)  # (T, d)
        with torch.autocast(x.device.type, enabled=False):
            r = self.router(x.float(), prev)
        ids, w = r.ids, r.weights  # (T, K)
        if self.force_balance:  # Megatron / torchtitan: balanced round-robin ids, the router's probabilities there
            ids = torch.arange(x.shape[0] * self.top_k, device=x.device).view(-1, self.top_k) % self.n_experts
            w = r.probs.gather(1, ids)
        if self.drop_top1:  # eval.py's analysis: the first choice masked, the others keep the total |w|
            if ids.shape[1] < 2:
                raise ValueError("drop_top1 needs top_k >= 2: with one expert per token nothing would be left")
            ids, w = drop_top1(ids, w)
        scaled = w * self.routed_scale
        y, load, dropped = self.routed(x, ids, scaled)
        if hasattr(self.router, 'cheap_output'):
            y = y + self.router.cheap_output(x.float(), ids, scaled)
        if self.shared is not None:
            s = self.shared(x, load.new_tensor([x.shape[0]]))  # (T, d)
            if self.shared_gate is not None:  # Qwen2-MoE: sigmoid(w . x) scales the shared experts' output
                s = torch.sigmoid(self.shared_gate(x)) * s
            y = y + self.shared_scale * s
        training_step = self.training and torch.is_grad_enabled()
        self.record_stats(ids, w, load, dropped, training_step)
        aux = dict(balance=self.balance(r.probs, ids, B, r.balance_weight, training_step),
                   z=x.new_zeros((), dtype=torch.float32) if r.logits is None else z_loss(r.logits),
                   router=r.loss, state=r.state)
        return y.to(x.dtype).view(B, S, d), aux

    def balance(self, probs, ids, B, weight, training_step):
        """the balance loss in this layer's scope: 'batch' (f and P over the micro-batch), 'sequence' (DeepSeek-V3,
        per sequence, averaged), 'global' (Qiu et al. 2025, Megatron global_aux_loss: f from the counts of this step's
        micro-batches so far summed over the ranks of balance_group, P local; in training steps only, else 'batch')"""
        if self.balance_scope == 'global' and training_step:
            c = assignment_counts(ids, probs.shape[1])[0]  # (n,) this micro-batch's assignments
            if self.balance_group is not None:
                dist.all_reduce(c, group=self.balance_group)
            self.balance_counts = c if self.balance_counts is None else self.balance_counts + c
            return balance_loss(probs, ids, 1, weight, counts=self.balance_counts)
        return balance_loss(probs, ids, B if self.balance_scope == 'sequence' else 1, weight)

    def routed(self, x, ids, w):
        """sorted dispatch of the T*K slots' assignments to the FFN experts, then the weighted sum over each token's slots
        -> (y (T, d), assignments per expert before any drop (E,), dropped count)"""
        T, E = x.shape[0], self.n_experts
        k = min(ids.shape[1], self.top_k)  # capacity's k: top_k (hyper's current k; the target of variable routers)
        flat = ids.t().reshape(-1)  # (K*T,) slot-major: every first choice comes before any second choice
        key = torch.where(flat < 0, E, flat.clamp(max=E))  # UNUSED slots and cheap ids sort last, as E
        order = key.argsort(stable=True)  # FFN experts first, then what costs no FFN
        load = torch.bincount(key, minlength=E + 1)[:E]  # (E,)
        n = int(load.sum())  # the layer's one host sync
        order, counts = order[:n], load
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor > 0:
            cap = math.ceil(capacity_factor * k * T / E)
            pos = torch.arange(n, device=x.device) - (load.cumsum(0) - load).repeat_interleave(load, output_size=n)  # place in its expert
            order, counts = order[pos < cap], load.clamp(max=cap)
        token = order % T  # (N,) the token of each kept assignment
        y = self.run_experts(x.index_select(0, token), counts, w.t().reshape(-1)[order], (token, T))  # (T, d)
        return y, load, n - counts.sum()

    def run_experts(self, xs, counts, scale, combine):
        """xs (N, d) sorted by global expert id, counts (E,) rows per expert, scale (N,) their combine weights,
        combine = (their tokens (N,), T): run the experts, wherever they live -> (T, d) each token's weighted sum"""
        if self.ep_size == 1:
            return self.experts(xs, counts, scale, combine)
        ep, el = self.ep_size, self.n_experts // self.ep_size
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.ep_group)  # recv[r*el + j]: rank r's rows for my expert j
        in_splits = counts.view(ep, el).sum(1).tolist()
        out_splits = recv.view(ep, el).sum(1).tolist()
        xr = AllToAll.apply(xs, out_splits, in_splits, self.ep_group)  # (M, d) rank-major, then expert
        sr = AllToAll.apply(scale[:, None], out_splits, in_splits, self.ep_group)  # (M, 1) their weights
        local = torch.arange(el, device=xs.device).repeat(ep).repeat_interleave(recv)  # local expert of each row
        regroup = local.argsort(stable=True)  # rank-major -> expert-major
        ye = self.experts(xr[regroup], recv.view(ep, el).sum(0), sr[regroup, 0])
        yr = torch.empty_like(ye).index_copy_(0, regroup, ye)  # back to rank-major
        ys = AllToAll.apply(yr, in_splits, out_splits, self.ep_group)  # (N, d) back where they came from
        return ys.new_zeros(combine[1], ys.shape[1]).index_add_(0, combine[0], ys)

    @torch.no_grad()
    def record_stats(self, ids, w, load, dropped, training_step):
        self.load += load
        if training_step:  # counts for the deepseek bias update and ReMoE's sparsity
            self.step_counts += load
            self.step_tokens += ids.shape[0]
        entropy, margin, negative = weight_sums(w)
        now = dict(tokens=entropy.new_tensor(ids.shape[0]), assignments=load.sum().float(), dropped=dropped.float(),
                   entropy=entropy, margin=margin, slots=(ids >= 0).sum().float(), negative=negative)
        self.sums += torch.stack([now[k] for k in SUMS])
        if self.record is not None:
            self.record.append((ids.cpu(), w.cpu()))

    def stats(self):
        """routing statistics since the last reset: load per expert and its CV, max/mean, entropy of the load,
        experts per token (FFN assignments per token before any drop: k for top-k routers, variable for ReMoE, top-p,
        expert choice, fewer for cheap experts), mean entropy of the slots' weights, router margin (|w|_(1) - |w|_(2)),
        dropped fraction, share of the used slots with a negative weight (signed routers)"""
        s = dict(zip(SUMS, self.sums.tolist()))
        return dict(**load_stats(self.load), experts_per_token=s['assignments'] / max(s['tokens'], 1),
                    weight_entropy=s['entropy'] / max(s['tokens'], 1), margin=s['margin'] / max(s['tokens'], 1),
                    dropped=s['dropped'] / max(s['assignments'], 1), negative=s['negative'] / max(s['slots'], 1))

    def reset_stats(self):
        self.load.zero_()
        self.sums.zero_()


def set_expert_parallel(model, group):
    """the process group in which every MoE layer exchanges tokens (its ranks hold E/ep_size experts each)"""
    for m in model.modules():
        if isinstance(m, MoE):
            m.ep_group = group


def end_step(model, group=None, update=True):
    """after each optimizer step (update=False: a skipped one): the routers that learn from the step's counts get
    them, summed over every rank in one all-reduce: DeepSeek-V3's bias per layer (b += u sign(mean - c)), ReMoE's
    L1 coefficient from the sparsity 1 - assignments / (tokens E) over all its layers; then every layer counts the
    next step afresh (the 'global' balance scope too: Megatron's reset_global_aux_loss_tracker)"""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    learners = [m for m in layers if hasattr(m.router, 'update_bias') or hasattr(m.router, 'update_coefficient')]
    if update and learners:
        c = torch.stack([torch.cat([m.step_counts, m.step_tokens[None]]) for m in learners])  # (L, E+1)
        if dist.is_initialized():
            dist.all_reduce(c, group=group)
        remoe = [(m, row) for m, row in zip(learners, c) if hasattr(m.router, 'update_coefficient')]
        for m, row in zip(learners, c):
            if hasattr(m.router, 'update_bias'):
                m.router.update_bias(row[:-1])
        slots = sum(row[-1] * m.n_experts for m, row in remoe)
        if remoe and slots > 0:
            sparsity = 1 - (sum(row[:-1].sum() for _, row in remoe) / slots).item()
            for m, _ in remoe:
                m.router.update_coefficient(sparsity)
    for m in layers:
        m.step_counts.zero_()
        m.step_tokens.zero_()
        m.balance_counts = None


def set_balance_group(model, group):
    """the process group whose ranks' assignment counts the 'global' balance scope sums (train.py: every rank, as
    each holds other tokens; None = this process only)"""
    for m in model.modules():
        if isinstance(m, MoE):
            m.balance_group = group


def set_progress(model, frac):
    for m in model.modules():
        if isinstance(m, Router):
            m.progress = frac
