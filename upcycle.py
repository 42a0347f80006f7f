"""
Sparse upcycling: a dense model -> an MoE model whose experts start as copies (or slices) of the
dense MLP and whose routers start at N(0, router_init_std) (Komatsuzaki et al. 2023; LibMoE's MoE
stage).

    python upcycle.py --init_from=path/to/SmolLM2-135M-Instruct.Q4_1.gguf configs/sigmoid.py \
        --n_experts=4 --out_dir=out/smol_sigmoid
    python upcycle.py --init_from=gpt2 --router=softmax --n_experts=4 --top_k=2 \
        --out_dir=out/gpt2_softmax
    # import only, no MoE
    python upcycle.py --init_from=out/dense --router=dense --out_dir=out/dense_copy
then fine-tune on data prepared with the model's tokenizer (prepare.py
--tokenizer gguf:path/to/...gguf):
    python train.py configs/sigmoid.py --init_from=out/smol_sigmoid --dataset=NAME \
        --out_dir=out/smol_sigmoid_ft

init_from: a checkpoint folder of ours (ckpt.pt), a Hugging Face model name or folder (GPT-2 -> arch
'gpt2'; Llama / Mistral -> arch 'llama'), or a .gguf file (loaded and dequantised by transformers).
A Hugging Face MoE of MOE_TYPES (Mixtral, OLMoE, Qwen2/3-MoE, Granite, DeepSeek-V3-style routers) is
imported with its own experts and routers; --router=NAME replaces them with fresh ones (re-routing):
    python upcycle.py --init_from=allenai/OLMoE-1B-7B-0924 --out_dir=out/olmoe
    python upcycle.py --init_from=allenai/OLMoE-1B-7B-0924 --router=sigmoid --out_dir=out/olmoe_sig
Writes out_dir/ckpt.pt (train.py's format, iter_num 0) and out_dir/config.json.

- The settings are GPTConfig's MoE fields and every router's options, declared in model.py and
  moe.py, plus upcycle's own (DEFAULTS). train.py's settings are accepted and ignored, so one config
  file serves both stages; the architecture comes from the source, and a config file that sets it
  gets a note.
- Expert e is slice (S + e) % g of the dense MLP's hidden units cut into g = mlp_hidden /
  expert_hidden slices (expert_init='copy' is g = 1, LibMoE's). The upcycled model computes exactly
  the dense function when the settings allow it; not_preserved says why not otherwise
  (tests/test_upcycle.py compares with transformers' logits), and the logits of both models are
  compared on 2 x 32 random tokens after building.
- The router of layer i is seeded seed + i (LibMoE: 42), so one
  layer's router does not depend on the others.
- An import maps transformers' in-memory state dict (experts stacked as moe.Experts holds them), so
  the per-expert files on disk are transformers' to merge; every tensor has a place or the import
  stops, and the logits are compared with transformers' after building (tests/test_import.py). An
  architecture model.py cannot run is refused in one line naming the part (UNSUPPORTED).
The methods, their sources and when each preserves the dense function: docs/upcycle.md.
"""
import os
import re
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import load_checkpoint, save_checkpoint, write_json
from cli import errors, parse, settings_of
from model import GPT, GPTConfig, settings
from model import limits as model_limits
from moe import MoE, router_knobs, router_settings

# the MoE settings: GPTConfig's 'moe' fields (router_options given as each router's own settings)
# and its 'system' ones but ep_size (a checkpoint holds the whole model: expert parallelism is
# train.py's to choose)
MOE_KEYS = [k for k in settings(kind='moe') + settings(kind='system')
            if k not in ('router_options', 'ep_size')]
DEFAULTS = dict(
    # checkpoint folder, Hugging Face name or folder, or .gguf file
    init_from='',
    out_dir='out/upcycle',
    # 0 = the source's (llama: at most 2048); smaller crops the positions
    block_size=0,
    # 'copy' (every expert = the dense MLP) or 'split' (slices of its hidden units)
    expert_init='copy',
    # std of the noise added to routed experts, relative to each matrix's std
    expert_noise=0.0,
    router_init_std=0.02,
    # router of layer i: torch.Generator seeded seed + i (LibMoE: 42)
    seed=42,
    **{f.name: f.default for f in fields(GPTConfig) if f.name in MOE_KEYS},
    **router_settings(),
)
# the allowed values of upcycle's settings (cli.problem): the model's (model.py), and its own
LIMITS = {k: v for k, v in model_limits().items() if k in DEFAULTS} | dict(
    init_from='text', out_dir='writable', block_size='>= 0', expert_init=('copy', 'split'),
    expert_noise='>= 0', router_init_std='>= 0', seed='[0, 4294967296)')
# the dense architecture: set by the source, so ignored with a note
# (config files may compute with them)
ARCH_DEFAULTS = {f.name: f.default for f in fields(GPTConfig) if f.name in settings(kind='arch')
                 and f.name not in DEFAULTS}
# train.py's settings: accepted, and ignored unless upcycle has them
TRAIN_KEYS = list(settings_of(Path(__file__).with_name('train.py')))


# -----------------------------------------------------------------------------
# dense models: ours, Hugging Face GPT-2 / Llama, GGUF

def hf_model_args(cfg):
    """(GPTConfig arguments, maximum length) of a Hugging Face config;
    ValueError for what model.py cannot run"""
    name = f"{cfg.model_type} model '{getattr(cfg, '_name_or_path', '')}'"
    if cfg.model_type in MOE_TYPES:
        return hf_moe_args(cfg, name)
    if cfg.model_type in UNSUPPORTED:
        raise ValueError(f"unsupported {name}: {UNSUPPORTED[cfg.model_type]}")
    if cfg.model_type == 'gpt2':
        tanh_gelu = cfg.activation_function in ('gelu_new', 'gelu_pytorch_tanh')
        if not tanh_gelu or cfg.scale_attn_by_inverse_layer_idx:
            raise ValueError(f"{name}: only GPT-2's tanh GELU and standard attention scaling "
                             f"are supported")
        args = dict(arch='gpt2', vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_embd=cfg.n_embd, mlp_hidden=cfg.n_inner or 4 * cfg.n_embd, bias=True,
                    norm_eps=cfg.layer_norm_epsilon, tie_embeddings=cfg.tie_word_embeddings)
        return args, cfg.n_positions
    if cfg.model_type not in ('llama', 'mistral'):
        raise ValueError(f"unsupported {name}: upcycle.py converts gpt2 and llama-family (llama, "
                         f"mistral) models and the MoE models {', '.join(MOE_TYPES)}")
    # transformers 5 / 4
    rope = getattr(cfg, 'rope_parameters', None) or getattr(cfg, 'rope_scaling', None) or {}
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    problem = None
    if rope.get('rope_type', rope.get('type', 'default')) != 'default':
        problem = 'rope scaling'
    elif getattr(cfg, 'attention_bias', 0) or getattr(cfg, 'mlp_bias', 0):
        problem = 'attention or MLP biases'
    elif cfg.hidden_act != 'silu':
        problem = f"hidden_act={cfg.hidden_act}"
    elif head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problem = f"head_dim={head_dim} != hidden / heads"
    elif getattr(cfg, 'sliding_window', None):
        problem = 'a sliding window'
    if problem:
        raise ValueError(f"{name} has {problem}, which model.py's llama blocks do not implement")
    args = dict(arch='llama', vocab_size=cfg.vocab_size, n_layer=cfg.num_hidden_layers,
                n_head=cfg.num_attention_heads, n_kv_head=cfg.num_key_value_heads,
                n_embd=cfg.hidden_size, mlp_hidden=cfg.intermediate_size, bias=False,
                tie_embeddings=cfg.tie_word_embeddings,
                rope_theta=float(rope.get('rope_theta') or cfg.rope_theta),
                norm_eps=cfg.rms_norm_eps)
    return args, cfg.max_position_embeddings


def hf_model(source):
    """a transformers causal LM in float32 from a hub name, a folder
    or a .gguf file (its config checked first)"""
    from transformers import AutoConfig, AutoModelForCausalLM
    if source.endswith('.gguf'):
        # reading a GGUF file's config costs as much as loading the model: load, then check
        folder, name = os.path.split(os.path.abspath(source))
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        hf_model_args(hf.config)
        return hf
    try:
        hf_model_args(AutoConfig.from_pretrained(source))
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as e:
        raise ValueError(f"cannot load '{source}': {str(e).splitlines()[0]}")


# Hugging Face -> ours, in every layer
LLAMA_NAMES = {'input_layernorm': 'ln_1', 'post_attention_layernorm': 'ln_2',
               'self_attn.q_proj': 'attn.q_proj',
               'self_attn.k_proj': 'attn.k_proj', 'self_attn.v_proj': 'attn.v_proj',
               'self_attn.o_proj': 'attn.c_proj', 'mlp.down_proj': 'mlp.c_proj'}


def hf_state_dict(hf, arch, n_layer):
    """the Hugging Face state dict in our names: GPT-2's Conv1D
    weights transposed, llama's c_fc = [gate; up]"""
    sd = hf.state_dict()
    if arch == 'gpt2':
        # the names are ours already; Conv1D stores (in, out); old versions keep causal-mask buffers
        conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight',
                  'mlp.c_fc.weight', 'mlp.c_proj.weight')
        masks = ('.attn.bias', '.attn.masked_bias')
        return {k: v.t() if k.endswith(conv1d) else v for k, v in sd.items()
                if not k.endswith(masks)}
    wte = sd['model.embed_tokens.weight']
    # tied: transformers may leave lm_head out
    out = {'transformer.wte.weight': wte, 'transformer.ln_f.weight': sd['model.norm.weight'],
           'lm_head.weight': sd.get('lm_head.weight', wte)}
    for i in range(n_layer):
        theirs, ours = f'model.layers.{i}.', f'transformer.h.{i}.'
        out |= {f'{ours}{b}.weight': sd[f'{theirs}{a}.weight'] for a, b in LLAMA_NAMES.items()}
        gate, up = sd[theirs + 'mlp.gate_proj.weight'], sd[theirs + 'mlp.up_proj.weight']
        # (2 * mlp_hidden, n_embd)
        out[ours + 'mlp.c_fc.weight'] = torch.cat([gate, up])
    return out


def built_model(model_args, sd, block_size):
    """a GPT holding state dict sd (every parameter and buffer covered, every shape asserted; gpt2
    positions cropped)"""
    model = GPT(GPTConfig(**{**model_args, 'block_size': block_size, 'ep_size': 1}))
    if 'transformer.wpe.weight' in sd:
        sd = {**sd, 'transformer.wpe.weight': sd['transformer.wpe.weight'][:block_size]}
    ours = model.state_dict()
    assert ours.keys() == sd.keys(), f"state dicts differ: {sorted(ours.keys() ^ sd.keys())[:6]}"
    with torch.no_grad():
        for k, v in sd.items():
            assert v.shape == ours[k].shape, \
                f"{k}: source {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
            ours[k].copy_(v)
    return model


def load_source(source, block_size=None):
    """(GPT, tokenizer spec, the transformers model or None) from a dense checkpoint folder of ours,
    a Hugging Face name or folder (dense, or an MoE of MOE_TYPES with its own experts and routers),
    or a .gguf file"""
    source, hf = os.path.expanduser(source), None
    if os.path.isfile(os.path.join(source, 'ckpt.pt')):
        # ValueError, one line, for a checkpoint that does not load
        ckpt = load_checkpoint(source)[0]
        args, sd, tokenizer = ckpt['model_args'], ckpt['model'], ckpt.get('tokenizer')
        if args.get('router', 'dense') != 'dense':
            raise ValueError(f"{source} already has MoE layers (router={args['router']}): "
                             f"upcycle a dense checkpoint")
        max_len = default = args['block_size']
    else:
        local = (os.path.exists(source) or source.endswith('.gguf')
                 or source.startswith(('/', '.', '~')))
        if local and not (os.path.isfile(os.path.join(source, 'config.json'))
                          or os.path.isfile(source)):
            raise ValueError(f"init_from={source} is not a checkpoint folder (ckpt.pt), "
                             f"a Hugging Face folder "
                             f"(config.json) or a .gguf file")
        hf = hf_model(source)
        args, max_len = hf_model_args(hf.config)
        default = min(max_len, 2048) if args['arch'] == 'llama' else max_len
        moe = args.get('router', 'dense') != 'dense'
        sd = hf_moe_state_dict(hf) if moe else hf_state_dict(hf, args['arch'], args['n_layer'])
        kind = 'gguf:' if source.endswith('.gguf') else 'hf:'
        tokenizer = kind + (os.path.abspath(source) if local else source)
    if (block_size or default) > max_len:
        raise ValueError(f"block_size={block_size} is longer than the source's {max_len} positions")
    return built_model(args, sd, block_size or default), tokenizer, hf


def load_dense(source, block_size=None):
    """(GPT, tokenizer spec): load_source without the transformers model"""
    return load_source(source, block_size)[:2]

# -----------------------------------------------------------------------------
# pretrained MoE models: imported with their own experts and routers (docs/upcycle.md)

# the Hugging Face MoE classes whose function model.py computes exactly: each one's router in moe.py
MOE_TYPES = {'mixtral': 'softmax', 'olmoe': 'softmax', 'qwen2_moe': 'softmax',
             'qwen3_moe': 'softmax', 'granitemoe': 'softmax', 'granitemoeshared': 'softmax',
             'solar_open': 'deepseek', 'dots1': 'deepseek', 'glm4_moe': 'deepseek',
             'param2moe': 'deepseek', 'sarvam_moe': 'deepseek',
             'minimax_m2': 'deepseek', 'hy_v3': 'deepseek'}
# the configs transformers runs as Glm4MoeForCausalLM: biases on q, k and v only (no o_proj bias)
GLM4_MOE = ('glm4_moe', 'param2moe', 'sarvam_moe')
# transformers' other MoE causal LMs: the part model.py lacks
# (../shared/reference/hf_moe_import.md reads each one's source)
MLA = ("multi-head latent attention (MLA: low-rank q / kv projections, a rotary slice) "
       "is not in model.py")
HYBRID = ("a hybrid of attention with recurrent layers (Mamba, linear or delta attention, "
          "convolutions)")
UNSUPPORTED = {
    **dict.fromkeys(['deepseek_v2', 'deepseek_v3', 'deepseek_v32', 'deepseek_v4', 'glm4_moe_lite',
                     'glm_moe_dsa', 'mistral4', 'longcat_flash', 'axk1', 'axk2', 'dots3_note',
                     'hy_v4', 'kimi_linear', 'sarvam_mla'], MLA),
    'dots3_note_text': MLA,
    **dict.fromkeys(['jamba', 'granitemoehybrid', 'nemotron_h', 'qwen3_next', 'qwen3_5_moe',
                     'qwen3_5_moe_text', 'qwen4_exp', 'qwen4_exp_text', 'lara_mini', 'lfm2_moe',
                     'minimax', 'bailing_hybrid', 'zaya', 'inkling_text', 'inkling2',
                     'inkling2_text', 'inkling2_loop', 'inkling2_loop_text'],
                    HYBRID + " is not in model.py"),
    **dict.fromkeys(['minicpm5_moe', 'afmoe', 'beam', 'laguna'],
                    "a gated attention output is not in model.py"),
    'cohere2_moe': "a parallel attention || MLP block is not in model.py",
    **dict.fromkeys(['llama4', 'llama4_text'],
                    "its router weights scale the experts' input, not their output"),
    'phimoe': "the sparsemixer router and LayerNorms with biases are not in model.py",
    'dbrx': "LayerNorm without bias and clip_qkv are not in model.py's llama blocks",
    'gpt_oss': "attention sinks, a router bias and the clamped SwiGLU are not in model.py",
    'ernie4_5_moe': "its router adds the correction bias to softmax probabilities: "
                    "no router of moe.py does",
    'aria_text': "its experts, stored transposed as (E, d, 2I) and (E, I, d), have no mapping "
                 "in the import",
    'flex_olmo': "post-norm blocks (OLMo-2) are not in model.py",
    **dict.fromkeys(['kolibri1', 'kolibri1_1'],
                    "sandwich norms and NoPE layers are not in model.py"),
    'hunyuan_v1_moe': "qk-norm after the rotary embedding is not in model.py",
    'exaone_moe': "rotary embeddings on the sliding-window layers only are not in model.py",
    'mellum': "rope parameters per layer type (sliding-window layers with their own rope_theta) "
              "are not in model.py",
    **dict.fromkeys(['doge', 'ergo', 'flint', 'gemma4', 'gemma4_text', 'granitemoe_swa', 'jetmoe',
                     'mimo_v2_flash', 'minimax_m3_vl', 'minimax_m3_vl_text'],
                    "its attention (dynamic masks, residual gates, sinks, mixture of attention "
                    "heads or sparse indexers) is not in model.py"),
}


def moe_problem(cfg):
    """the part of a supported MoE config that model.py does not run, or None"""
    rope = getattr(cfg, 'rope_parameters', None) or getattr(cfg, 'rope_scaling', None) or {}
    # per-layer-type rope parameters (a sliding window has its own)
    types = getattr(cfg, 'layer_types', None) or ['full_attention']
    if rope.get('rope_type', rope.get('type', 'default')) != 'default':
        return 'rope scaling'
    if cfg.hidden_act != 'silu':
        return f"hidden_act={cfg.hidden_act}"
    if getattr(cfg, 'attention_bias', False) and cfg.model_type not in GLM4_MOE:
        return "a bias on the attention output projection"
    if getattr(cfg, 'mlp_bias', False):
        return 'MLP biases'
    if getattr(cfg, 'clip_qkv', None):
        return f"clip_qkv={cfg.clip_qkv}"
    if any(t != 'full_attention' for t in types) or getattr(cfg, 'use_sliding_window', False) \
            or (cfg.model_type == 'mixtral' and cfg.sliding_window):
        return 'a sliding window'
    return None


def hf_moe_args(cfg, name):
    """(GPTConfig arguments, maximum length) of a Hugging Face MoE config of MOE_TYPES"""
    t = cfg.model_type
    problem = moe_problem(cfg)
    if problem:
        raise ValueError(f"{name} has {problem}, which model.py does not implement")
    rope = getattr(cfg, 'rope_parameters', None) or {}
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    partial = rope.get('partial_rotary_factor', 1.0)
    E = next(getattr(cfg, k) for k in ('num_local_experts', 'num_experts', 'n_routed_experts')
             if getattr(cfg, k, None))
    expert_hidden = getattr(cfg, 'moe_intermediate_size', None) or cfg.intermediate_size
    args = dict(arch='llama', vocab_size=cfg.vocab_size, n_layer=cfg.num_hidden_layers,
                n_head=cfg.num_attention_heads, n_kv_head=cfg.num_key_value_heads,
                n_embd=cfg.hidden_size, head_dim=head_dim,
                rotary_dim=int(head_dim * partial) if partial != 1.0 else 0,
                mlp_hidden=getattr(cfg, 'intermediate_size', None) or expert_hidden, bias=False,
                tie_embeddings=cfg.tie_word_embeddings,
                rope_theta=float(rope.get('rope_theta') or cfg.rope_theta),
                norm_eps=cfg.rms_norm_eps,
                router=MOE_TYPES[t], n_experts=E, top_k=cfg.num_experts_per_tok,
                expert_hidden=expert_hidden,
                # Mixtral and Granite always renormalise
                router_renorm=getattr(cfg, 'norm_topk_prob', True))
    if t in ('olmoe', 'minimax_m2'):
        args |= dict(qk_norm='full')
    if t in ('qwen3_moe', 'dots1', 'hy_v3') or getattr(cfg, 'use_qk_norm', False):
        args |= dict(qk_norm='head')
    if t in ('qwen2_moe', 'qwen3_moe'):
        # MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
        args |= dict(moe_every=cfg.decoder_sparse_step,
                     dense_layers=','.join(map(str, cfg.mlp_only_layers)))
    if getattr(cfg, 'mlp_layer_types', None):
        # HY-V3: 'dense' or 'sparse' per layer
        dense = [i for i, kind in enumerate(cfg.mlp_layer_types) if kind == 'dense']
        args |= dict(dense_layers=','.join(map(str, dense)))
    if t == 'qwen2_moe':
        args |= dict(qkv_bias=cfg.qkv_bias, n_shared_experts=1, shared_gate=True,
                     shared_hidden=cfg.shared_expert_intermediate_size)
    if t in GLM4_MOE:
        # q, k and v only (its o_proj has none)
        args |= dict(qkv_bias=cfg.attention_bias)
    if t.startswith('granitemoe'):
        args |= dict(attn_scale=cfg.attention_multiplier, embed_scale=cfg.embedding_multiplier,
                     residual_scale=cfg.residual_multiplier, logit_divisor=cfg.logits_scaling)
    if t == 'granitemoeshared' and cfg.shared_intermediate_size:
        args |= dict(n_shared_experts=1, shared_hidden=cfg.shared_intermediate_size)
    if MOE_TYPES[t] == 'deepseek':
        # MiniMax-M2: no groups, no scale, no shared experts; HY-V3: no groups, its own names
        scale = getattr(cfg, 'routed_scaling_factor', getattr(cfg, 'router_scaling_factor', 1.0))
        shared = getattr(cfg, 'n_shared_experts', getattr(cfg, 'num_shared_experts', 0))
        args |= dict(routed_scale=float(scale), n_shared_experts=shared or 0,
                     moe_first_dense=getattr(cfg, 'first_k_dense_replace', 0),
                     router_options=dict(n_group=getattr(cfg, 'n_group', 1),
                                         topk_group=getattr(cfg, 'topk_group', 1)))
    return args, cfg.max_position_embeddings


# Hugging Face -> ours, in every layer of an MoE model: transformers 5's names in memory, where the
# experts are stacked (E, 2I, d) with [gate; up] rows and (E, d, I), as moe.Experts
MOE_NAMES = {'input_layernorm.weight': 'ln_1.weight',
             'post_attention_layernorm.weight': 'ln_2.weight',
             **{f'self_attn.{p}_proj.{w}': f'attn.{p}_proj.{w}'
                for p in 'qkv' for w in ('weight', 'bias')},
             'self_attn.o_proj.weight': 'attn.c_proj.weight',
             'self_attn.q_norm.weight': 'attn.q_norm.weight',
             'self_attn.k_norm.weight': 'attn.k_norm.weight',
             'mlp.down_proj.weight': 'mlp.c_proj.weight',
             'mlp.gate.weight': 'mlp.router.gate.weight',
             'block_sparse_moe.router.weight': 'mlp.router.gate.weight',
             'mlp.gate.e_score_correction_bias': 'mlp.router.expert_bias',
             'mlp.e_score_correction_bias': 'mlp.router.expert_bias',
             'mlp.experts.gate_up_proj': 'mlp.experts.c_fc',
             'mlp.experts.down_proj': 'mlp.experts.c_proj',
             'block_sparse_moe.experts.gate_up_proj': 'mlp.experts.c_fc',
             'block_sparse_moe.experts.down_proj': 'mlp.experts.c_proj',
             'mlp.shared_expert_gate.weight': 'mlp.shared_gate.weight',
             'mlp.shared_expert.down_proj.weight': 'mlp.shared.c_proj',
             'mlp.shared_experts.down_proj.weight': 'mlp.shared.c_proj',
             'shared_mlp.input_linear.weight': 'mlp.shared.c_fc',
             'shared_mlp.output_linear.weight': 'mlp.shared.c_proj'}
# SwiGLU MLPs held as gate_proj and up_proj: ours is [gate; up] in one matrix
GATE_UP = {'mlp.': 'mlp.c_fc.weight', 'mlp.shared_expert.': 'mlp.shared.c_fc',
           'mlp.shared_experts.': 'mlp.shared.c_fc'}


def hf_moe_state_dict(hf):
    """an MoE model's state dict in our names; ValueError naming a tensor that has no place"""
    sd, out = hf.state_dict(), {}
    wte = sd.pop('model.embed_tokens.weight')
    out['transformer.wte.weight'] = wte
    out['transformer.ln_f.weight'] = sd.pop('model.norm.weight')
    # tied: transformers may leave lm_head out
    out['lm_head.weight'] = sd.pop('lm_head.weight', wte)
    for k in [k for k in sd if k.endswith('gate_proj.weight')]:
        theirs = k[:-len('gate_proj.weight')]
        i, where = re.fullmatch(r'model\.layers\.(\d+)\.(.+)', theirs).groups()
        gate, up = sd.pop(k), sd.pop(theirs + 'up_proj.weight')
        out[f'transformer.h.{i}.{GATE_UP[where]}'] = torch.cat([gate, up])
    for k, v in sd.items():
        m = re.fullmatch(r'model\.layers\.(\d+)\.(.+)', k)
        if not m or m[2] not in MOE_NAMES:
            raise ValueError(f"{type(hf).__name__}: no place in model.py for the tensor {k}")
        out[f'transformer.h.{m[1]}.{MOE_NAMES[m[2]]}'] = v
    # the shared experts are one stacked expert: (1, out, in)
    return {k: v[None] if '.mlp.shared.c_' in k else v for k, v in out.items()}

# -----------------------------------------------------------------------------
# upcycling

def init_router(router, std, gen):
    """a fresh router: its Linears' weights N(0, std) drawn from gen, their biases 0"""
    for m in router.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std, generator=gen)
            if m.bias is not None:
                m.bias.zero_()


def set_expert(experts, e, mlp, units, bias_share):
    """expert e := the dense MLP restricted to the hidden units
    `units`, with bias_share of its output bias"""
    h = mlp.c_proj.weight.shape[1]
    # llama's c_fc rows are [gate; up]
    rows = units if experts.arch == 'gpt2' else torch.cat([units, units + h])
    pairs = [(experts.c_fc[e], mlp.c_fc.weight[rows]),
             (experts.c_proj[e], mlp.c_proj.weight[:, units])]
    if experts.b_fc is not None:
        pairs += [(experts.b_fc[e], mlp.c_fc.bias[rows]),
                  (experts.b_proj[e], mlp.c_proj.bias * bias_share)]
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape, \
            f"expert {tuple(ours.shape)} vs dense slice {tuple(theirs.shape)}"
        ours.copy_(theirs)


@torch.no_grad()
def upcycle_model(dense, moe_args, expert_init='copy', expert_noise=0.0, router_init_std=0.02,
                  seed=42):
    """the MoE GPT of dense with the MoE settings moe_args (MOE_KEYS and router_options)"""
    wrong = set(moe_args) - set(MOE_KEYS) - {'router_options'}
    if wrong:
        raise ValueError(f"not MoE settings: {sorted(wrong)}")
    config = GPTConfig(**{**asdict(dense.config), **moe_args, 'ep_size': 1})
    h, eh, S, E = config.mlp_hidden, config.expert_hidden, config.n_shared_experts, config.n_experts
    if expert_init == 'copy' and eh != h:
        raise ValueError(f"expert_init='copy' copies the whole MLP: "
                         f"leave expert_hidden=0 (= {h}) or use 'split'")
    if expert_init == 'split' and (eh == h or h % eh):
        raise ValueError(f"expert_init='split' cuts the MLP's {h} hidden units into slices: "
                         f"set expert_hidden "
                         f"to a divisor of {h} smaller than it (got {eh})")
    if expert_init not in ('copy', 'split'):
        raise ValueError(f"expert_init={expert_init!r}: use 'copy' or 'split'")
    if config.moe_latent_size:
        raise ValueError(f"moe_latent_size={config.moe_latent_size}: latent experts work in "
                         f"another width than the dense MLP, so they cannot be copied from it: "
                         f"leave it 0")
    g = h // eh
    with torch.random.fork_rng():
        # the routers' other state: cosine's expert embeddings, hyper's embedding, moepp's c
        torch.manual_seed(seed)
        model = GPT(config)
    ours, theirs = model.state_dict(), dense.state_dict()
    assert all('.mlp.' in k for k in ours.keys() - theirs.keys()), \
        "only the MoE layers' MLPs are new"
    # everything but the MLPs of the MoE layers
    for k, v in theirs.items():
        if k in ours:
            assert v.shape == ours[k].shape, \
                f"{k}: dense {tuple(v.shape)} vs upcycled {tuple(ours[k].shape)}"
            ours[k].copy_(v)

    def piece(s):
        """the hidden units of slice s"""
        return torch.arange(s * eh, (s + 1) * eh)

    for i, block in enumerate(model.transformer.h):
        if not config.is_moe(i):
            continue
        layer, mlp, gen = (block.mlp, dense.transformer.h[i].mlp,
                           torch.Generator().manual_seed(seed + i))
        init_router(layer.router, router_init_std, gen)
        if S:
            set_expert(layer.shared, 0, mlp, torch.cat([piece(j % g) for j in range(S)]), S / g)
        for e in range(E):
            set_expert(layer.experts, e, mlp, piece((S + e) % g), 1 / g)
            for w in (layer.experts.c_fc[e], layer.experts.c_proj[e]) if expert_noise > 0 else ():
                w.add_(torch.randn(w.shape, generator=gen) * expert_noise * w.std())
    return model


def not_preserved(c, expert_noise=0.0, router_init_std=0.02):
    """why an upcycled model with config c may compute another
    function than its dense model ([]: it cannot)"""
    if not any(c.is_moe(i) for i in range(c.n_layer)):
        return []
    why = []
    g, S, E = c.mlp_hidden // c.expert_hidden, c.n_shared_experts, c.n_experts
    if c.router == 'switch':
        why.append("switch weights each token's expert by max p < 1 (no renorm)")
    elif c.router == 'tcmoe':
        why.append("tcmoe's negative slots subtract expert outputs "
                   "and its null slots output nothing")
    elif c.router == 'moepp':
        why.append("moepp can pick its zero / copy / constant experts instead of the MLP copies")
    elif c.router != 'hyper' and not c.router_renorm:
        why.append(f"router_renorm=False: the top-k {c.router} weights do not sum to 1")
    total = c.routed_scale + S * c.shared_scale
    if g == 1 and abs(total - 1) > 1e-9:
        why.append(f"routed_scale + n_shared_experts * shared_scale = {total:g}, not 1")
    every_slice_once = (S + E == g and c.top_k == E and c.routed_scale == E
                        and (S == 0 or c.shared_scale == 1)
                        and router_init_std == 0)
    if g > 1 and not every_slice_once:
        why.append(f"expert_init='split': each expert holds 1/{g} of the MLP's hidden units, "
                   f"and the experts "
                   f"add up to the MLP only when n_shared_experts + n_experts = {g}, "
                   f"top_k = n_experts = "
                   f"routed_scale, shared_scale = 1 and router_init_std = 0")
    if c.capacity_factor > 0:
        why.append(f"capacity_factor={c.capacity_factor:g} may drop assignments in training")
    if c.eval_capacity_factor > 0:
        why.append(f"eval_capacity_factor={c.eval_capacity_factor:g} "
                   f"may drop assignments at evaluation")
    if expert_noise > 0:
        why.append(f"expert_noise={expert_noise:g} perturbs the expert copies")
    return why


@torch.no_grad()
def logit_diff(a, b, n_seq=2, seq_len=32, seed=0):
    """(max |logits_a - logits_b|, max |logits_a|) on n_seq random sequences of seq_len tokens"""
    a.eval(), b.eval()
    shape = (n_seq, min(seq_len, a.config.block_size))
    idx = torch.randint(a.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    la, lb = a(idx)[0], b(idx)[0]
    return (la - lb).abs().max().item(), la.abs().max().item()


def save_upcycled(out_dir, model, tokenizer, config, source):
    """out_dir/ckpt.pt in train.py's format and out_dir/config.json, each written atomically"""
    os.makedirs(out_dir, exist_ok=True)
    ckpt = dict(model=model.state_dict(), model_args=asdict(model.config), tokenizer=tokenizer,
                iter_num=0, best_val_loss=1e9, config=config, source=source)
    # a new model: an older ckpt.prev.pt is not its previous one
    save_checkpoint(out_dir, ckpt, previous='drop')
    write_json(os.path.join(out_dir, 'config.json'), config)


# an imported MoE: the settings a run chooses (training knobs, how the model runs) are the ones
# given; the router's are the source's unless --router re-routes it; the rest is the source's
RUN_KEYS = [k for k in MOE_KEYS if k in settings(knob=True) + settings(kind='system')]
ROUTER_KEYS = ['router', 'top_k', 'router_renorm']


@torch.no_grad()
def imported_model(model, changes, reroute=False, router_init_std=0.02, seed=42):
    """model with changes to its config (GPTConfig fields); reroute: its routers fresh (layer i's
    Linears drawn from a generator seeded seed + i, their other state under
    torch.manual_seed(seed)), every other tensor kept"""
    config = GPTConfig(**{**asdict(model.config), **changes})
    if config == model.config and not reroute:
        return model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new = GPT(config)

    def router_keys(m):
        return {f'{name}.router.{k}' for name, layer in m.named_modules() if isinstance(layer, MoE)
                for k in layer.router.state_dict()}

    old = router_keys(model) if reroute else set()
    theirs = {k: v for k, v in model.state_dict().items() if k not in old}
    missing, unexpected = new.load_state_dict(theirs, strict=not reroute)
    assert not unexpected and set(missing) == (router_keys(new) if reroute else set()), \
        f"only the routers are new: missing {missing[:4]}, unexpected {unexpected[:4]}"
    for i, block in enumerate(new.transformer.h):
        if reroute and config.is_moe(i):
            init_router(block.mlp.router, router_init_std, torch.Generator().manual_seed(seed + i))
    return new


def imported(model, hf, config, given):
    """the imported MoE model with the run settings given, re-routed when config names a router;
    prints its function check: against transformers, or against the import when re-routed"""
    c, reroute = model.config, config['router'] != 'dense'
    own = [k for k in MOE_KEYS if k not in RUN_KEYS and not (reroute and k in ROUTER_KEYS)]
    knobs = router_knobs()
    ignored = [f'{k}={config[k]!r}' for k in own if k in given and config[k] != getattr(c, k)]
    ignored += [f'{k}={config[k]!r}' for k, v in c.router_options.items()
                if not reroute and k not in knobs and k in given and config[k] != v]
    if ignored:
        print(f"ignoring {', '.join(ignored)}: the MoE comes from init_from "
              f"(--router=NAME re-routes it)")
    changes = {k: config[k] for k in RUN_KEYS}
    changes['router_options'] = {k: config[k] if k in knobs else v
                                 for k, v in c.router_options.items()}
    if reroute:
        changes |= {k: config[k] for k in ROUTER_KEYS if k == 'router' or k in given}
        changes['router_options'] = {k: config[k] for k in router_settings()}
    new = imported_model(model, changes, reroute, config['router_init_std'], config['seed'])
    n, (total, active) = new.config, new.num_params()
    n_moe = sum(n.is_moe(i) for i in range(n.n_layer))
    print(f"router={n.router}{' (re-routed from ' + c.router + ')' if reroute else ''}: "
          f"{n_moe} of {n.n_layer} layers MoE ({n.n_experts} experts, top_k {n.top_k}, "
          f"{n.n_shared_experts} shared, expert_hidden {n.expert_hidden}); "
          f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active")
    if reroute:
        diff, scale = logit_diff(new, model)
        print(f"function check on 2 x 32 random tokens: max |logits - import's logits| = "
              f"{diff:.2e} (max |logit| {scale:.1f})")
        print(f"a fresh {n.router} router replaces the source's trained {c.router} router: the "
              f"experts differ, so the re-routed model computes another function")
        return new
    diff, scale = logit_diff(new, hf)
    print(f"function check on 2 x 32 random tokens: max |logits - transformers logits| = "
          f"{diff:.2e} (max |logit| {scale:.1f})")
    if diff > 1e-4 * max(scale, 1.0):
        print("WARNING: the import should compute the transformers model's function, "
              "but the logits differ")
    else:
        print("the import computes the transformers model's function")
    return new


def upcycled(dense, config):
    """the upcycled MoE of dense; prints its function check against dense"""
    moe_args = {k: config[k] for k in MOE_KEYS}
    moe_args['router_options'] = {k: config[k] for k in router_settings()}
    model = upcycle_model(dense, moe_args, expert_init=config['expert_init'],
                          expert_noise=config['expert_noise'],
                          router_init_std=config['router_init_std'], seed=config['seed'])
    c, (total, active) = model.config, model.num_params()
    n_moe = sum(c.is_moe(i) for i in range(c.n_layer))
    print(f"router={c.router}: {n_moe} of {c.n_layer} layers MoE "
          f"({c.n_experts} experts, top_k {c.top_k}, "
          f"{c.n_shared_experts} shared, expert_hidden {c.expert_hidden}, "
          f"expert_init={config['expert_init']}); "
          f"{dense.num_params()[0] / 1e6:.2f}M parameters -> {total / 1e6:.2f}M, "
          f"{active / 1e6:.2f}M active")
    diff, scale = logit_diff(dense, model)
    why = not_preserved(c, config['expert_noise'], config['router_init_std'])
    print(f"function check on 2 x 32 random tokens: max |logits - dense logits| = {diff:.2e} "
          f"(max |logit| {scale:.1f})")
    if why:
        print("these settings do not preserve the dense model's function: " + "; ".join(why))
    elif diff > 1e-4 * max(scale, 1.0):
        print("WARNING: these settings should preserve the dense function, but the logits differ")
    else:
        print("the upcycled model computes the dense model's function")
    return model


def main(argv):
    config, given = parse(DEFAULTS | ARCH_DEFAULTS, argv, extra=TRAIN_KEYS, limits=LIMITS)
    # train.py's settings, the architecture's included
    ignored = {k: config.pop(k) for k in list(config) if k not in DEFAULTS}
    arch = [f'{k}={v!r}' for k, v in ignored.items()
            if k in ARCH_DEFAULTS and v != ARCH_DEFAULTS[k]]
    if arch:
        print(f"ignoring {', '.join(arch)}: the architecture comes from init_from")
    source = config['init_from']
    # 'scratch' and 'resume' are train.py's
    if source in ('', 'scratch', 'resume'):
        raise ValueError("set --init_from to a checkpoint folder, "
                         "a Hugging Face model name or folder, or a .gguf file")
    model, tokenizer, hf = load_source(source, config['block_size'] or None)
    c = model.config
    print(f"loaded {source}: {c.arch}, {c.n_layer} layers, n_embd {c.n_embd}, "
          f"{c.n_head} heads / {c.n_kv_head} kv, "
          f"mlp_hidden {c.mlp_hidden}, vocab {c.vocab_size}, block_size {c.block_size}, "
          f"tokenizer {tokenizer}")
    if c.router == 'dense':
        model = upcycled(model, config)
    else:
        model = imported(model, hf, config, given)
    # the transformers model is no longer needed: its memory back before saving
    del hf
    save_upcycled(config['out_dir'], model, tokenizer, config, source)
    print(f"saved {os.path.join(config['out_dir'], 'ckpt.pt')}")


if __name__ == '__main__':
    with errors('upcycle.py'):
        main(sys.argv[1:])
