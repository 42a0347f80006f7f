"""
A GPT language model with optional Mixture-of-Experts layers, in two block flavours:
- gpt2:  LayerNorm, learned positions, GELU MLP with biases, tied embeddings (loads HF GPT-2)
- llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, tied or untied embeddings
         (loads Llama-family checkpoints such as SmolLM2); with the options of the MoE models
         upcycle.py imports (head_dim, qk_norm, qkv_bias, rotary_dim, Granite's multipliers:
         docs/import.md)
Which layers are MoE is a config rule (moe_every, moe_first_dense, dense_layers); the MoE layer
lives in moe.py.

Decisions:
- GPTConfig is the one declaration of every model setting, each marked with its kind and whether it
  is a training knob; train.py, upcycle.py, export.py and study.py derive their lists from it.
- forward returns the aux losses (with_aux=True), averaged over the MoE layers so that a coefficient
  means the same at any depth (Megatron and ReMoE sum them, LibMoE averages: docs/routers.md);
  nothing is left on the model for a caller to read.
- AdamW is fused on CPU too: several times faster there (docs/performance.md).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe import MoE, ROUTERS, Experts, activation, moe_layers, router_knobs, router_limits


def setting(default, kind, knob=False, limit=None):
    """a field of GPTConfig. kind: 'arch' (the dense architecture: a dense source fixes it when
    upcycling), 'moe' (the MoE layers), 'system' (how the model runs, not what it computes: never
    taken from a checkpoint). knob: a training knob, which a run started from a checkpoint may
    change; every other field of a checkpoint's model is fixed by it (train.py refuses a
    contradiction). limit: its allowed values, as the scripts check them (cli.problem)"""
    meta = dict(kind=kind, knob=knob, limit=limit)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class GPTConfig:
    """every model setting, declared once; train.py, upcycle.py, export.py and study.py derive their
    lists from these fields and their marks (settings()), and from each router's options and knobs
    (moe.py)"""
    arch: str = setting('gpt2', 'arch', limit=('gpt2', 'llama'))  # 'gpt2' or 'llama'
    block_size: int = setting(1024, 'arch', limit='>= 1')
    vocab_size: int = setting(50304, 'arch', limit='>= 1')
    n_layer: int = setting(12, 'arch', limit='>= 1')
    n_head: int = setting(12, 'arch', limit='>= 1')
    # llama grouped-query attention: key/value heads (0 = n_head)
    n_kv_head: int = setting(0, 'arch', limit='>= 0')
    n_embd: int = setting(768, 'arch', limit='>= 1')
    # dense MLP hidden size (0 = 4 * n_embd)
    mlp_hidden: int = setting(0, 'arch', limit='>= 0')
    dropout: float = setting(0.0, 'arch', knob=True, limit='[0, 1)')
    # biases in Linears and LayerNorms
    bias: bool = setting(True, 'arch')
    # biases on the query, key and value projections only (Qwen2-MoE); `bias` sets them too
    qkv_bias: bool = setting(False, 'arch')
    # width of an attention head (0 = n_embd / n_head; Qwen3 sets it apart)
    head_dim: int = setting(0, 'arch', limit='>= 0')
    # the dims of each head that rotary rotates, the first ones (0 = all; GLM-4.5: half)
    rotary_dim: int = setting(0, 'arch', limit='>= 0')
    # RMSNorm of queries and keys before rotary: 'none', 'full' (over all heads' width together,
    # OLMoE) or 'head' (over each head, Qwen3)
    qk_norm: str = setting('none', 'arch', limit=('none', 'full', 'head'))
    # Granite's multipliers: the attention scale (0 = head_dim ** -0.5), the embeddings' factor,
    # each residual branch's factor, and the divisor of the logits
    attn_scale: float = setting(0.0, 'arch', limit='>= 0')
    embed_scale: float = setting(1.0, 'arch', limit='> 0')
    residual_scale: float = setting(1.0, 'arch', limit='> 0')
    logit_divisor: float = setting(1.0, 'arch', limit='> 0')
    tie_embeddings: bool = setting(True, 'arch')
    rope_theta: float = setting(10000.0, 'arch', limit='> 0')
    norm_eps: float = setting(1e-5, 'arch', limit='> 0')
    # 'dense' (no MoE) or a name in moe.ROUTERS (its choices: limits())
    router: str = setting('dense', 'moe')
    n_experts: int = setting(8, 'moe', limit='>= 1')
    top_k: int = setting(2, 'moe', limit='>= 1')
    # layer i (counted after the dense prefix) is MoE when (i + 1) % moe_every == 0
    moe_every: int = setting(1, 'moe', limit='>= 1')
    # the first N layers stay dense
    moe_first_dense: int = setting(0, 'moe', limit='>= 0')
    # expert hidden size (0 = mlp_hidden); smaller for fine-grained experts
    expert_hidden: int = setting(0, 'moe', limit='>= 0')
    # the routed experts' width (0 = n_embd): tokens projected down before dispatch and the
    # weighted sum up after the combine (Megatron moe_latent_size)
    moe_latent_size: int = setting(0, 'moe', limit='>= 0')
    # layers that stay dense whatever the rule above says, e.g. '0,3' (Qwen2-MoE's mlp_only_layers)
    dense_layers: str = setting('', 'moe', limit='text')
    # always-on experts of size expert_hidden, added to the routed output (DeepSeekMoE)
    n_shared_experts: int = setting(0, 'moe', limit='>= 0')
    # their width together (0 = n_shared_experts * expert_hidden; Qwen2-MoE sets it apart)
    shared_hidden: int = setting(0, 'moe', limit='>= 0')
    shared_scale: float = setting(1.0, 'moe', limit='>= 0')
    # weight of the routed experts' output (DeepSeek-V3: 2.5)
    routed_scale: float = setting(1.0, 'moe', limit='>= 0')
    # divide the top-k weights by their sum
    router_renorm: bool = setting(True, 'moe')
    # 0 = dropless; else each expert takes ceil(cf * k * T / E) assignments in training
    capacity_factor: float = setting(0.0, 'moe', knob=True, limit='>= 0')
    # capacity at evaluation (0 = dropless: eval-time drops inflate the loss)
    eval_capacity_factor: float = setting(0.0, 'moe', knob=True, limit='>= 0')
    aux_loss_coef: float = setting(0.01, 'moe', knob=True, limit='>= 0')
    z_loss_coef: float = setting(0.001, 'moe', knob=True, limit='>= 0')
    # the balance loss over 'batch', 'sequence' (DeepSeek-V3) or 'global' (the step, every rank;
    # Qwen3)
    balance_scope: str = setting('batch', 'moe', knob=True, limit=('batch', 'sequence', 'global'))
    # benchmarking: any router's choices replaced by balanced round-robin ids (torchtitan)
    force_balance: bool = setting(False, 'moe', knob=True)
    # Qwen2-MoE: sigmoid(w . x) scales the shared experts' output
    shared_gate: bool = setting(False, 'moe')
    # 'auto', 'grouped' (F.grouped_mm) or 'loop' (one matmul per expert): the same math
    expert_impl: str = setting('auto', 'system', limit=('auto', 'grouped', 'loop'))
    # expert parallelism: experts sharded over this many ranks
    ep_size: int = setting(1, 'system', limit='>= 1')
    # 'block': each block's activations are recomputed in the backward (torch.utils.checkpoint)
    # instead of kept; the routing is counted once (moe.recomputing)
    activation_checkpointing: str = setting('none', 'system', limit=('none', 'block'))
    # the chosen router's own settings (moe.Router.options and .knobs)
    router_options: dict = setting({}, 'moe')

    def __post_init__(self):
        if self.arch not in ('gpt2', 'llama'):
            raise ValueError(f"unknown arch '{self.arch}': use 'gpt2' or 'llama'")
        if self.router != 'dense' and self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}': "
                             f"choose one of dense, {', '.join(ROUTERS)}")
        if (self.n_embd % self.n_head and not self.head_dim) \
                or self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             f"(or set head_dim), and n_head by n_kv_head={self.n_kv_head}")
        if self.qk_norm not in ('none', 'full', 'head'):
            raise ValueError(f"qk_norm={self.qk_norm!r}: use 'none', 'full' or 'head'")
        if self.balance_scope not in ('batch', 'sequence', 'global'):
            raise ValueError(f"balance_scope={self.balance_scope!r}: "
                             f"use 'batch', 'sequence' or 'global'")
        if self.shared_gate and not self.n_shared_experts:
            raise ValueError("shared_gate=True gates the shared experts: set n_shared_experts >= 1")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        try:
            dense = [int(i) for i in self.dense_layers.split(',') if i.strip()]
        except ValueError:
            raise ValueError(f"dense_layers={self.dense_layers!r}: "
                             f"give layer indices separated by commas, e.g. '0,3'")
        self.dense_layers = ','.join(map(str, dense))
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        self.expert_hidden = self.expert_hidden or self.mlp_hidden
        defaults = ROUTERS[self.router].settings() if self.router in ROUTERS else {}
        self.router_options = {k: self.router_options.get(k, v) for k, v in defaults.items()}

    def is_moe(self, i):
        j = i - self.moe_first_dense
        return (self.router != 'dense' and j >= 0 and (j + 1) % self.moe_every == 0
                and str(i) not in self.dense_layers.split(','))


def settings(kind=None, knob=None):
    """the names of GPTConfig's fields of a kind ('arch', 'moe', 'system'), or that are (not)
    training knobs"""
    return [f.name for f in fields(GPTConfig)
            if kind in (None, f.metadata['kind']) and knob in (None, f.metadata['knob'])]


def knobs():
    """every training knob: the GPTConfig fields so marked and every router's knobs"""
    return settings(knob=True) + list(router_knobs())


def limits():
    """every model setting's allowed values (cli.problem): GPTConfig's marks, the router's choices
    (dense and the registry, as it is now) and every router's own limits (moe.py)"""
    marked = {f.name: f.metadata['limit'] for f in fields(GPTConfig) if f.metadata['limit']}
    return {**marked, 'router': ('dense', *ROUTERS), **router_limits()}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def norm(config):
    if config.arch == 'gpt2':
        return nn.LayerNorm(config.n_embd, bias=config.bias, eps=config.norm_eps)
    return RMSNorm(config.n_embd, config.norm_eps)


def rotary(config):
    """cos, sin (block_size, rotated dims) as Hugging Face Llama"""
    hd = config.rotary_dim or config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """x (..., hd) with its first cos.shape[-1] dims rotated, the others passed through"""
    r = cos.shape[-1]
    x_rot = x[..., :r]
    x1, x2 = x_rot.chunk(2, dim=-1)
    y = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return y if r == x.shape[-1] else torch.cat([y, x[..., r:]], dim=-1)


class LayerKV:
    """one layer's keys and values of the positions seen so far (GPT.generate's cache)"""

    def __init__(self):
        self.k = self.v = None  # (B, Hkv, P, hd)

    def __len__(self):
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v):
        """add the new positions' k, v (B, Hkv, S, hd); returns all of them"""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.arch, self.dropout = config.arch, config.dropout
        # the widths of q and of k (v)
        q_width, kv_width = self.n_head * hd, self.n_kv_head * hd
        qkv_bias = config.bias or config.qkv_bias
        if config.arch == 'gpt2':
            self.c_attn = nn.Linear(d, 3 * q_width, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(d, q_width, bias=qkv_bias)
            self.k_proj = nn.Linear(d, kv_width, bias=qkv_bias)
            self.v_proj = nn.Linear(d, kv_width, bias=qkv_bias)
        self.c_proj = nn.Linear(q_width, d, bias=config.bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm != 'none':
            full = self.qk_norm == 'full'
            self.q_norm = RMSNorm(q_width if full else hd, config.norm_eps)
            self.k_norm = RMSNorm(kv_width if full else hd, config.norm_eps)
        # None: SDPA's head_dim ** -0.5
        self.scale = config.attn_scale or None
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, kv=None):
        """rope: cos, sin of these S positions; kv: a LayerKV holding the earlier positions (or
        None)"""
        B, S, d = x.shape
        if self.arch == 'gpt2':
            q, k, v = self.c_attn(x).chunk(3, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == 'full':
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_head, -1).transpose(1, 2)  # (B, H, S, hd)
        k = k.view(B, S, self.n_kv_head, -1).transpose(1, 2)  # (B, Hkv, S, hd)
        v = v.view(B, S, self.n_kv_head, -1).transpose(1, 2)
        if self.qk_norm == 'head':
            q, k = self.q_norm(q), self.k_norm(k)
        if self.arch == 'llama':
            cos, sin = rope[0][:S].to(q.dtype), rope[1][:S].to(q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        P = len(kv) if kv is not None else 0  # positions already cached
        mask = None
        if kv is not None:
            k, v = kv.append(k, v)  # (B, Hkv, P+S, hd)
            if P and S > 1:  # query i sees the P cached positions and new positions up to i
                mask = torch.ones(S, P + S, dtype=torch.bool, device=x.device).tril(diagonal=P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=P == 0 and S > 1,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.scale,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, S, -1)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        # llama: [gate, up] in one matrix
        out = config.mlp_hidden * (1 if config.arch == 'gpt2' else 2)
        self.arch = config.arch
        self.c_fc = nn.Linear(config.n_embd, out, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)

    def forward(self, x, prev=None):
        return self.c_proj(activation(self.c_fc(x), self.arch)), {}


class Block(nn.Module):
    def __init__(self, config, moe):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = norm(config), Attention(config), norm(config)
        self.mlp = MoE(config, config.expert_hidden) if moe else MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.residual_scale = config.residual_scale
        self.recompute = config.activation_checkpointing == 'block'

    def forward(self, x, rope, kv=None, prev=None):
        """prev: the previous MoE layer's aux['state'], for this layer's router (MoE++'s gating
        residual). With activation checkpointing a training forward keeps only the block's inputs
        and runs again in the backward (inside the block, so FSDP's gather stays around both, as
        torchtitan places it)"""
        if self.recompute and kv is None and torch.is_grad_enabled():
            return checkpoint(self.run, x, rope, kv, prev, use_reentrant=False)
        return self.run(x, rope, kv, prev)

    def run(self, x, rope, kv=None, prev=None):
        x = x + self.residual_scale * self.attn(self.ln_1(x), rope, kv)
        h, aux = self.mlp(self.ln_2(x), prev)
        return x + self.residual_scale * self.dropout(h), aux


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, config.is_moe(i)) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        if config.arch == 'gpt2':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        cos, sin = rotary(config)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scaled init of the residual projections
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(('c_proj.weight', '.c_proj')):
                nn.init.normal_(p, mean=0.0, std=proj_std)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, Experts):
            nn.init.normal_(module.c_fc, mean=0.0, std=0.02)

    def moe_layers(self):
        return moe_layers(self)

    def forward(self, idx, targets=None, cache=None, with_aux=False):
        """logits (B, S, vocab) for every position; loss = cross-entropy + weighted aux losses (None
        without targets); with_aux: also aux, the unweighted losses averaged over the MoE layers,
        dict(balance=, z=, router=) ({} for a dense model). cache: one LayerKV per layer holding the
        earlier positions (GPT.generate); idx then holds the new ones"""
        B, S = idx.shape
        # positions before idx
        P = len(cache[0]) if cache else 0
        if P + S > self.config.block_size:
            raise ValueError(f"sequence of length {P + S} is longer than "
                             f"block_size={self.config.block_size}")
        x = self.transformer.wte(idx) * self.config.embed_scale  # (B, S, d)
        if self.config.arch == 'gpt2':
            x = x + self.transformer.wpe(torch.arange(P, P + S, device=idx.device))
        x = self.transformer.drop(x)
        auxes, prev = [], None
        rope = (self.rope_cos[P:P + S], self.rope_sin[P:P + S])  # (S, hd) each
        for block, kv in zip(self.transformer.h, cache or [None] * len(self.transformer.h)):
            x, aux = block(x, rope, kv, prev)
            # an MoE layer: its router's state goes to the next MoE layer's router
            if aux:
                auxes.append(aux)
                prev = aux['state']
        logits = self.lm_head(self.transformer.ln_f(x)) / self.config.logit_divisor
        aux = {}
        if auxes:
            aux = {k: sum(a[k] for a in auxes) / len(auxes) for k in ('balance', 'z', 'router')}
        loss = None
        if targets is not None:
            flat = logits.view(-1, logits.size(-1)).float()
            loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
            if aux:
                c = self.config
                loss = (loss + c.aux_loss_coef * aux['balance'] + c.z_loss_coef * aux['z']
                        + aux['router'])
        return (logits, loss, aux) if with_aux else (logits, loss)

    def num_params(self):
        """(total, active per token); active counts top_k of the n_experts routed experts of each
        MoE layer"""
        total = sum(p.numel() for p in self.parameters())
        c = self.config
        for m in self.moe_layers():
            # experts on other ranks
            total += sum(p.numel() for p in m.experts.parameters()) * (c.ep_size - 1)
        local = sum(p.numel() for m in self.moe_layers() for p in m.experts.parameters())
        per_expert = local * c.ep_size // c.n_experts
        return total, total - per_expert * (c.n_experts - c.top_k)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             router_lr_scale=1.0):
        """AdamW; weight decay on matrices only (not norms, biases, embeddings); routers in a group
        of their own"""
        groups = dict(decay=[], no_decay=[], router=[])
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if '.router.' in name:
                groups['router'].append(p)
            elif p.dim() >= 2 and not name.startswith(('transformer.wte', 'transformer.wpe')) \
                    and not name.endswith(('.b_fc', '.b_proj')):  # stacked expert biases are 2-D
                groups['decay'].append(p)
            else:
                groups['no_decay'].append(p)
        optim_groups = [
            dict(params=groups['decay'], weight_decay=weight_decay, name='decay', lr_scale=1.0),
            dict(params=groups['no_decay'], weight_decay=0.0, name='no_decay', lr_scale=1.0),
            dict(params=groups['router'], weight_decay=0.0, name='router',
                 lr_scale=router_lr_scale),
        ]
        optim_groups = [g for g in optim_groups if g['params']]
        # fused on CPU too: several times faster than the for-loop AdamW (docs/performance.md)
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=True)

    def estimate_mfu(self, fwdbwd_per_iter, seq_len, dt, peak_flops):
        """model flops utilization on active parameters (PaLM appendix B), as a fraction of
        peak_flops"""
        c = self.config
        n = self.num_params()[1] - (self.transformer.wpe.weight.numel() if c.arch == 'gpt2' else 0)
        flops_per_token = 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
        return flops_per_token * seq_len * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True):
        """nanoGPT's sampling loop; temperature 0 is greedy (the most likely token). kv_cache: the
        keys and values of the tokens seen so far are kept, so each new token costs a forward of one
        position (total cost linear in the length) while the sequence fits in block_size; past it
        every step runs the last block_size tokens, as without the cache. The cached path routes
        each new token in a forward of its own: with a capacity factor its drops can differ."""
        cache = [LayerKV() for _ in self.transformer.h] if kv_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= self.config.block_size:
                # the new tokens only
                logits = self(idx[:, len(cache[0]):], cache=cache)[0][:, -1, :]
            else:
                logits = self(idx[:, -self.config.block_size:])[0][:, -1, :]
            if temperature == 0:
                idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
                continue
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
