"""
A GPT language model with optional Mixture-of-Experts layers, in two block flavours:
- gpt2:  LayerNorm, learned positions, GELU MLP with biases, tied embeddings (loads Hugging Face GPT-2 exactly)
- llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, tied or untied embeddings
         (loads Llama-family checkpoints such as SmolLM2 exactly)
Which layers are MoE is a config rule (moe_every, moe_first_dense); the MoE layer itself lives in moe.py.
"""
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import MoE, ROUTERS, Experts, activation


@dataclass
class GPTConfig:
    arch: str = 'gpt2'  # 'gpt2' or 'llama'
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # llama grouped-query attention: key/value heads (0 = n_head)
    n_embd: int = 768
    mlp_hidden: int = 0  # dense MLP hidden size (0 = 4 * n_embd)
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # MoE
    router: str = 'dense'  # 'dense' (no MoE) or a name in moe.ROUTERS
    n_experts: int = 8
    top_k: int = 2
    moe_every: int = 1  # layer i (counted after the dense prefix) is MoE when (i + 1) % moe_every == 0
    moe_first_dense: int = 0  # the first N layers stay dense
    expert_hidden: int = 0  # expert hidden size (0 = mlp_hidden)
    n_shared_experts: int = 0  # always-on experts of size expert_hidden, added to the routed output
    shared_scale: float = 1.0
    routed_scale: float = 1.0
    router_renorm: bool = True
    capacity_factor: float = 0.0  # 0 = dropless
    eval_capacity_factor: float = 0.0  # capacity at eval (0 = dropless: eval-time drops inflate the loss)
    expert_impl: str = 'auto'  # 'auto', 'grouped' (F.grouped_mm) or 'loop' (one matmul per expert): same math
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    balance_per_sequence: bool = False  # the same as balance_scope='sequence' (kept for older configs and checkpoints)
    balance_scope: str = 'batch'  # balance loss over 'batch', 'sequence' (DeepSeek-V3) or 'global' (step, all ranks; Qwen3)
    force_balance: bool = False  # benchmarking: any router's choices replaced by balanced round-robin ids (torchtitan)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(w . x) scales the shared experts' output
    ep_size: int = 1  # expert parallelism: experts sharded over this many ranks
    router_options: dict = field(default_factory=dict)  # the chosen router's own options (moe.Router.options)

    def __post_init__(self):
        if self.arch not in ('gpt2', 'llama'):
            raise ValueError(f"unknown arch '{self.arch}': use 'gpt2' or 'llama'")
        if self.router != 'dense' and self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}': choose one of dense, {', '.join(ROUTERS)}")
        if self.n_embd % self.n_head or self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}, "
                             f"and n_head by n_kv_head={self.n_kv_head}")
        if self.balance_scope not in ('batch', 'sequence', 'global'):
            raise ValueError(f"balance_scope={self.balance_scope!r}: use 'batch', 'sequence' or 'global'")
        if self.balance_per_sequence and self.balance_scope == 'global':
            raise ValueError("balance_per_sequence=True contradicts balance_scope='global': set one of them")
        if self.balance_per_sequence:
            self.balance_scope = 'sequence'
        if self.shared_gate and not self.n_shared_experts:
            raise ValueError("shared_gate=True gates the shared experts: set n_shared_experts >= 1")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        self.expert_hidden = self.expert_hidden or self.mlp_hidden
        defaults = ROUTERS[self.router].options if self.router in ROUTERS else {}
        self.router_options = {k: self.router_options.get(k, v) for k, v in defaults.items()}

    def is_moe(self, i):
        j = i - self.moe_first_dense
        return self.router != 'dense' and j >= 0 and (j + 1) % self.moe_every == 0


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
    """cos, sin (block_size, head_dim) as Hugging Face Llama"""
    hd = config.n_embd // config.n_head
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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
        d, hd = config.n_embd, config.n_embd // config.n_head
        self.n_head, self.n_kv_head, self.arch, self.dropout = config.n_head, config.n_kv_head, config.arch, config.dropout
        if config.arch == 'gpt2':
            self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)
        else:
            self.q_proj = nn.Linear(d, d, bias=config.bias)
            self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.bias)
            self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.bias)
        self.c_proj = nn.Linear(d, d, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, kv=None):
        """rope: cos, sin of these S positions; kv: a LayerKV holding the earlier positions (or None)"""
        B, S, d = x.shape
        if self.arch == 'gpt2':
            q, k, v = self.c_attn(x).split(d, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, self.n_head, -1).transpose(1, 2)  # (B, H, S, hd)
        k = k.view(B, S, self.n_kv_head, -1).transpose(1, 2)  # (B, Hkv, S, hd)
        v = v.view(B, S, self.n_kv_head, -1).transpose(1, 2)
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
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, S, d)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        out = config.mlp_hidden * (1 if config.arch == 'gpt2' else 2)  # llama: [gate, up] in one matrix
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

    def forward(self, x, rope, kv=None, prev=None):
        """prev: the previous MoE layer's aux['state'], for this layer's router (MoE++'s gating residual)"""
        x = x + self.attn(self.ln_1(x), rope, kv)
        h, aux = self.mlp(self.ln_2(x), prev)
        return x + self.dropout(h), aux


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
        self.aux = {}  # unweighted aux losses of the last forward, averaged over MoE layers (for logging)
        self.apply(self._init_weights)
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scaled init of the residual projections
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
        return [b.mlp for b in self.transformer.h if isinstance(b.mlp, MoE)]

    def forward(self, idx, targets=None, cache=None):
        """logits (B, S, vocab) for every position; loss = cross-entropy + weighted aux losses (with targets);
        cache: one LayerKV per layer holding the earlier positions (GPT.generate), idx then holds the new ones"""
        B, S = idx.shape
        P = len(cache[0]) if cache else 0  # positions before idx
        if P + S > self.config.block_size:
            raise ValueError(f"sequence of length {P + S} is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, S, d)
        if self.config.arch == 'gpt2':
            x = x + self.transformer.wpe(torch.arange(P, P + S, device=idx.device))
        x = self.transformer.drop(x)
        auxes, prev = [], None
        rope = (self.rope_cos[P:P + S], self.rope_sin[P:P + S])  # (S, hd) each
        for block, kv in zip(self.transformer.h, cache or [None] * len(self.transformer.h)):
            x, aux = block(x, rope, kv, prev)
            if aux:  # an MoE layer: its router's state goes to the next MoE layer's router
                auxes.append(aux)
                prev = aux['state']
        logits = self.lm_head(self.transformer.ln_f(x))
        self.aux = {k: sum(a[k] for a in auxes) / len(auxes) for k in ('balance', 'z', 'router')} if auxes else {}
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        if self.aux:
            c = self.config
            loss = loss + c.aux_loss_coef * self.aux['balance'] + c.z_loss_coef * self.aux['z'] + self.aux['router']
        return logits, loss

    def num_params(self):
        """(total, active per token); active counts top_k of the n_experts routed experts of each MoE layer"""
        total = sum(p.numel() for p in self.parameters())
        c = self.config
        for m in self.moe_layers():
            total += sum(p.numel() for p in m.experts.parameters()) * (c.ep_size - 1)  # experts on other ranks
        per_expert = sum(p.numel() for m in self.moe_layers() for p in m.experts.parameters()) * c.ep_size // c.n_experts
        return total, total - per_expert * (c.n_experts - c.top_k)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, router_lr_scale=1.0):
        """AdamW; weight decay on matrices only (not norms, biases, embeddings); routers in a group of their own"""
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
        optim_groups = [dict(params=groups['decay'], weight_decay=weight_decay, name='decay', lr_scale=1.0),
                        dict(params=groups['no_decay'], weight_decay=0.0, name='no_decay', lr_scale=1.0),
                        dict(params=groups['router'], weight_decay=0.0, name='router', lr_scale=router_lr_scale)]
        optim_groups = [g for g in optim_groups if g['params']]
        # fused on CPU too: 0.13 s against 0.81 s for the for-loop AdamW on 33M parameters (2-core AMD EPYC, fp32)
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=True)

    def estimate_mfu(self, fwdbwd_per_iter, seq_len, dt, peak_flops):
        """model flops utilization on active parameters (PaLM appendix B), as a fraction of peak_flops"""
        c = self.config
        n = self.num_params()[1] - (self.transformer.wpe.weight.numel() if c.arch == 'gpt2' else 0)
        flops_per_token = 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len
        return flops_per_token * seq_len * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True):
        """nanoGPT's sampling loop. kv_cache: the keys and values of the tokens seen so far are kept, so each new
        token costs a forward of one position (total cost linear in the length) while the sequence fits in
        block_size; past it every step runs the last block_size tokens, as without the cache. The cached path
        routes each new token in a forward of its own: with a capacity factor its drops can differ."""
        cache = [LayerKV() for _ in self.transformer.h] if kv_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= self.config.block_size:
                logits = self(idx[:, len(cache[0]):], cache=cache)[0][:, -1, :] / temperature  # the new tokens only
            else:
                logits = self(idx[:, -self.config.block_size:])[0][:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        return idx


CKPT, PREVIOUS = 'ckpt.pt', 'ckpt.prev.pt'  # a checkpoint folder's checkpoint and the one saved before it


def auto_dtype(device_type):
    """the autocast dtype for dtype='auto' -> (name, why): bfloat16 where the hardware runs bf16 matmuls fast (CUDA
    GPUs with bf16; CPUs with AMX or AVX-512 BF16), else float32: on an AVX2-only CPU a bf16 matmul is ~100x slower"""
    if device_type == 'cuda':
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return 'bfloat16', f'{name} runs bf16'
        return 'float32', f'{name} has no bf16'
    flags = set()
    if os.path.exists('/proc/cpuinfo'):
        flags = {f for line in open('/proc/cpuinfo') if line.startswith('flags') for f in line.split(':')[1].split()}
    fast = [f for f in ('amx_bf16', 'avx512_bf16') if f in flags]
    if fast:
        return 'bfloat16', f'the CPU has {fast[0]} (fast bf16 matmuls)'
    return 'float32', 'the CPU has neither AMX nor AVX-512 BF16 (bf16 matmuls would be far slower than fp32)'


def save_checkpoint(out_dir, ckpt, previous='keep'):
    """out_dir/ckpt.pt, written atomically and durably: a temporary file, fsync, then a rename (a crash never leaves
    half a file). previous: 'keep' = the checkpoint it replaces becomes out_dir/ckpt.prev.pt (a hard link: no copy,
    no moment without a ckpt.pt); 'leave' = ckpt.prev.pt stays as it is (a run that fell back to it); 'drop' = an old
    ckpt.prev.pt is removed (it belongs to another run). OSError (disk full, ...) leaves the old files as they were."""
    path, tmp = os.path.join(out_dir, CKPT), os.path.join(out_dir, CKPT + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        if previous == 'keep' and os.path.exists(path):
            prev_tmp = os.path.join(out_dir, PREVIOUS + '.tmp')
            if os.path.exists(prev_tmp):
                os.remove(prev_tmp)
            try:
                os.link(path, prev_tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, os.path.join(out_dir, PREVIOUS))
        elif previous == 'drop' and os.path.exists(os.path.join(out_dir, PREVIOUS)):
            os.remove(os.path.join(out_dir, PREVIOUS))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(out_dir, os.O_RDONLY)  # the renames themselves survive a power cut
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path, device='cpu'):
    """a checkpoint file, checked whole: readable, train.py's layout, weights that fit its own model_args and are
    finite; else ValueError saying what is wrong with it (one line)"""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle, random bytes: all the same to the reader
        raise ValueError(f"{path} cannot be read, it is truncated or corrupted ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict) or not isinstance(ckpt.get('model_args'), dict):
        raise ValueError(f"{path} is not a checkpoint of train.py or upcycle.py (no model and model_args)")
    try:
        with torch.device('meta'):  # the model's shapes without memory or time
            expected = GPT(GPTConfig(**ckpt['model_args'])).state_dict()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} holds a model this version of model.py cannot build ({str(e).splitlines()[0]})")
    got = ckpt['model']
    wrong = sorted(expected.keys() ^ got.keys()) + sorted(k for k in expected.keys() & got.keys()
                                                           if expected[k].shape != got[k].shape)
    if wrong:
        raise ValueError(f"{path} holds weights of another architecture than its model_args say "
                         f"({len(wrong)} names or shapes differ, e.g. {wrong[0]})")
    bad = next((k for k, v in got.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:
        raise ValueError(f"{path} holds non-finite weights ({bad} has NaN or inf)")
    return ckpt


def load_checkpoint(ckpt_dir, device='cpu', fallback=False):
    """(checkpoint, path, note) of ckpt_dir/ckpt.pt, checked by read_checkpoint. When it cannot be used: with
    fallback, the previous checkpoint ckpt_dir/ckpt.prev.pt, and note (a warning line) says so; else ValueError,
    one line naming the file and the fix."""
    path, prev = os.path.join(ckpt_dir, CKPT), os.path.join(ckpt_dir, PREVIOUS)
    try:
        return read_checkpoint(path, device), path, None
    except ValueError as e:
        problem = e
    if not os.path.exists(prev):
        fix = ("train one with train.py or make one with upcycle.py" if not os.path.exists(path) else
               "train again, or use another checkpoint folder")
        raise ValueError(f"{problem}: {fix}")
    if not fallback:
        raise ValueError(f"{problem}: the previous checkpoint is {prev}; to use it, copy it over "
                         f"{CKPT} (train.py init_from=resume falls back to it by itself)")
    try:
        ckpt = read_checkpoint(prev, device)
    except ValueError as e:
        raise ValueError(f"{problem}, and the previous checkpoint too: {e}: train again")
    return ckpt, prev, (f"warning: {problem}; falling back to the previous checkpoint {prev} "
                        f"(iteration {ckpt.get('iter_num', '?')})")


def load_model(out_dir, device='cpu'):
    """the model of a checkpoint folder (out_dir/ckpt.pt written by train.py or upcycle.py) -> (model, checkpoint);
    ValueError (one line: the file and the fix) when it cannot be loaded"""
    ckpt = load_checkpoint(out_dir, device)[0]
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.to(device), ckpt
