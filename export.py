"""
Export a checkpoint folder (ckpt.pt of train.py or upcycle.py) to a Hugging Face folder that
transformers.AutoModelForCausalLM.from_pretrained loads: config.json, model.safetensors, the
tokenizer files and generation_config.json.

    python export.py out/RUN --out_dir hf/RUN
    # our own code even where a native class is exact
    python export.py out/RUN --out_dir hf/RUN --remote_code

- A native class (GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM, OlmoeForCausalLM,
  Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, GraniteMoeForCausalLM, GraniteMoeSharedForCausalLM,
  SolarOpenForCausalLM, Dots1ForCausalLM, Glm4MoeForCausalLM) only where transformers computes
  exactly our function (native_arch): an imported model goes back to its own class, the deepseek
  router's expert_bias as e_score_correction_bias (tests/test_import.py).
  Any GPTConfig field a native class does not express, away from its default, means remote code;
  tests/test_export.py flips each such field, and loads every export back with from_pretrained to
  compare its logits with ours.
- Everything else is remote code (trust_remote_code=True): modeling_nanomoe.py next to verbatim
  copies of model.py and moe.py, so every router, present and future, is exact by construction,
  where a second transcription of the router math would drift from moe.py. The only edit is the
  import between the two files, made relative; export.py refuses a model.py or moe.py that imports
  any other file of this repository.
- The tokenizer is the run's (checkpoint.tokenizer_spec), rebuilt for transformers and checked
  against ours on a probe text; a run without one is exported without one, and the summary line says
  why.
- The folder is built in a temporary folder that is renamed at the end (checkpoint.atomic_dir), so a
  failed export leaves nothing behind.
Which class is exact for which settings, and the tokenizers: docs/export.md.
"""
import ast
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from checkpoint import atomic_dir, load_model, tokenizer_spec
from cli import errors, parse
from model import settings
from prepare import load_tokenizer

REPO = Path(__file__).resolve().parent
PROBE = "Hello world! It's 2026, naïve café.\nFIRST CITIZEN:\tWe are accounted poor citizens."
# export.py's settings (nanoGPT style: --key=value or --key value; the
# run folder is the bare argument)
SETTINGS = dict(
    # the checkpoint folder: a folder holding ckpt.pt (train.py or upcycle.py)
    run=[],
    # the Hugging Face folder to create (must not exist)
    out_dir='',
    # export our own code even where a native class is exact
    remote_code=False,
    # tokenizer spec where the checkpoint names none: gpt2, char, hf:..., gguf:...
    tokenizer='',
)
# the allowed values of the settings (cli.problem); out_dir must not exist yet (export)
LIMITS = dict(run='run', out_dir='writable', tokenizer='text')

# -----------------------------------------------------------------------------
# which architecture: a native transformers class where it is exact, else remote code

# export's own knowledge: the GPTConfig fields that native_arch and hf_config read (a native class
# expresses them), and the training-only ones (dropout, the aux losses' coefficients and scope): no
# change in eval mode
EXPRESSED = {'arch', 'block_size', 'vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd',
             'head_dim',
             'mlp_hidden', 'bias', 'tie_embeddings', 'rope_theta', 'norm_eps', 'router',
             'n_experts', 'top_k', 'moe_every',
             'moe_first_dense', 'expert_hidden', 'n_shared_experts', 'shared_scale', 'routed_scale',
             'router_renorm', 'capacity_factor', 'router_options',
             'dropout', 'aux_loss_coef', 'z_loss_coef', 'balance_scope'}
# and the 'system' fields: how the model runs, not what it computes
MAPPED = EXPRESSED | set(settings(kind='system'))
# the fields that some native classes express beyond MAPPED
GRANITE = {'attn_scale', 'embed_scale', 'residual_scale', 'logit_divisor'}
NATIVE_EXTRA = dict(olmoe={'qk_norm'}, qwen3_moe={'qk_norm', 'dense_layers'},
                    qwen2_moe={'qkv_bias', 'dense_layers', 'shared_hidden', 'shared_gate'},
                    granitemoe=GRANITE, granitemoeshared=GRANITE | {'shared_hidden'},
                    solar_open={'shared_hidden'}, dots1={'qk_norm', 'shared_hidden'},
                    glm4_moe={'qk_norm', 'qkv_bias', 'rotary_dim', 'shared_hidden'})


def native_arch(c):
    """'gpt2', 'llama', 'mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe', 'granitemoe',
    'granitemoeshared', 'solar_open', 'dots1' or 'glm4_moe' where transformers has exactly this
    model, else None.
    Any other GPTConfig field away from its default (an option added later: forced balance, ...)
    means remote code, which is exact whatever the option does."""
    away = {f.name for f in fields(c) if f.name not in MAPPED and getattr(c, f.name) != f.default}
    if c.router == 'dense':
        # GPT-2 has no head width of its own
        plain = c.arch == 'llama' or c.head_dim * c.n_head == c.n_embd
        return c.arch if plain and not away else None
    # softmax, top-k, no drops, routed output unscaled: every class below
    softmax = (c.arch == 'llama' and c.router == 'softmax' and not c.router_options
               and c.moe_first_dense == 0 and c.capacity_factor == 0 and c.routed_scale == 1
               and not c.bias)
    # every layer MoE, top-k renormalised
    every_renorm = softmax and c.router_renorm and c.moe_every == 1 and not c.dense_layers
    S, qk = c.n_shared_experts, c.qk_norm
    # DeepSeek-V3's router (sigmoid scores: V4's sqrtsoftplus has no native class) and ungated
    # shared experts of n_shared_experts * expert_hidden, every layer after the dense prefix MoE
    deepseek = (c.arch == 'llama' and c.router == 'deepseek' and c.capacity_factor == 0
                and c.router_options.get('score_function', 'sigmoid') == 'sigmoid'
                and not c.bias and c.moe_every == 1 and not c.dense_layers and S >= 1
                and c.shared_scale == 1 and c.shared_hidden in (0, S * c.expert_hidden))
    candidates = dict(
        mixtral=every_renorm and S == 0,
        # softmax of the top-k logits = renormalised top-k probabilities
        granitemoe=every_renorm and S == 0,
        # plus an ungated shared SwiGLU MLP
        granitemoeshared=every_renorm and S >= 1 and c.shared_scale == 1,
        olmoe=softmax and c.moe_every == 1 and not c.dense_layers and S == 0 and qk == 'full',
        qwen3_moe=softmax and S == 0 and qk == 'head',
        # one gated shared expert
        qwen2_moe=softmax and S == 1 and c.shared_gate and c.shared_scale == 1 and qk == 'none',
        solar_open=deepseek and c.moe_first_dense == 0 and qk == 'none',
        dots1=deepseek and qk == 'head',
        glm4_moe=deepseek and qk in ('none', 'head'))
    for kind, fits in candidates.items():
        if fits and away <= NATIVE_EXTRA.get(kind, set()):
            return kind
    return None


def hf_config(c, kind, eot):
    """the transformers config of a native export"""
    import transformers
    from transformers import GPT2Config, LlamaConfig, MixtralConfig
    if kind == 'gpt2':
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                          n_layer=c.n_layer, n_head=c.n_head, n_inner=c.mlp_hidden,
                          activation_function='gelu_new',
                          resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                          layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
                          bos_token_id=eot, eos_token_id=eot)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                  head_dim=c.head_dim, hidden_act='silu',
                  max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                  tie_word_embeddings=c.tie_embeddings,
                  rope_parameters=dict(rope_type='default', rope_theta=c.rope_theta),
                  attention_dropout=c.dropout, bos_token_id=eot, eos_token_id=eot)
    if kind == 'llama':
        return LlamaConfig(**common, intermediate_size=c.mlp_hidden, attention_bias=c.bias,
                           mlp_bias=c.bias)
    experts = dict(intermediate_size=c.expert_hidden, num_local_experts=c.n_experts,
                   num_experts_per_tok=c.top_k, router_aux_loss_coef=c.aux_loss_coef)
    shared = c.shared_hidden or c.expert_hidden * c.n_shared_experts
    if kind.startswith('granitemoe'):
        granite = dict(embedding_multiplier=c.embed_scale, logits_scaling=c.logit_divisor,
                       residual_multiplier=c.residual_scale,
                       attention_multiplier=c.attn_scale or c.head_dim ** -0.5)
        if kind == 'granitemoe':
            return transformers.GraniteMoeConfig(**common, **experts, **granite)
        return transformers.GraniteMoeSharedConfig(**common, **experts, **granite,
                                                   shared_intermediate_size=shared)
    if kind == 'olmoe':
        return transformers.OlmoeConfig(**common, **experts, norm_topk_prob=c.router_renorm)
    if kind.startswith('qwen'):
        cls = transformers.Qwen2MoeConfig if kind == 'qwen2_moe' else transformers.Qwen3MoeConfig
        extra = dict(qkv_bias=c.qkv_bias, shared_expert_intermediate_size=shared) \
            if kind == 'qwen2_moe' else dict(attention_bias=False)
        dense = [int(i) for i in c.dense_layers.split(',') if i]
        return cls(**common, **extra, intermediate_size=c.mlp_hidden,
                   moe_intermediate_size=c.expert_hidden, num_experts=c.n_experts,
                   num_experts_per_tok=c.top_k, norm_topk_prob=c.router_renorm,
                   decoder_sparse_step=c.moe_every, mlp_only_layers=dense,
                   router_aux_loss_coef=c.aux_loss_coef)
    if kind in ('solar_open', 'dots1', 'glm4_moe'):
        cls = dict(solar_open=transformers.SolarOpenConfig, dots1=transformers.Dots1Config,
                   glm4_moe=transformers.Glm4MoeConfig)[kind]
        extra = dict(sliding_window=None) if kind == 'dots1' else {}
        if kind == 'glm4_moe':
            rotary = (c.rotary_dim or c.head_dim) / c.head_dim
            extra = dict(attention_bias=c.qkv_bias, use_qk_norm=c.qk_norm == 'head',
                         rope_parameters=dict(rope_type='default', rope_theta=c.rope_theta,
                                              partial_rotary_factor=rotary))
        return cls(**{**common, **extra}, intermediate_size=c.mlp_hidden,
                   moe_intermediate_size=c.expert_hidden, n_routed_experts=c.n_experts,
                   num_experts_per_tok=c.top_k, n_shared_experts=c.n_shared_experts,
                   n_group=c.router_options['n_group'], topk_group=c.router_options['topk_group'],
                   routed_scaling_factor=c.routed_scale, norm_topk_prob=c.router_renorm,
                   first_k_dense_replace=c.moe_first_dense)
    return MixtralConfig(**common, **experts, sliding_window=None)

# the module holding the shared experts as gate_proj, up_proj and down_proj Linears
LINEAR_SHARED = dict(qwen2_moe='shared_expert', solar_open='shared_experts', dots1='shared_experts',
                     glm4_moe='shared_experts')


def hf_state_dict(model, kind):
    """our state dict in the names (and layouts) of the native class:
    the inverse of upcycle.hf_state_dict"""
    sd = model.state_dict()
    if kind == 'gpt2':
        # the same names; Conv1D stores (in, out)
        conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight',
                  'mlp.c_fc.weight', 'mlp.c_proj.weight')
        return {k: v.t() if k.endswith(conv1d) else v for k, v in sd.items()}
    out = {'model.embed_tokens.weight': sd['transformer.wte.weight'],
           'model.norm.weight': sd['transformer.ln_f.weight'],
           'lm_head.weight': sd['lm_head.weight']}
    # ours -> theirs, in every layer
    names = {'ln_1': 'input_layernorm', 'ln_2': 'post_attention_layernorm',
             'attn.q_proj': 'self_attn.q_proj',
             'attn.k_proj': 'self_attn.k_proj', 'attn.v_proj': 'self_attn.v_proj',
             'attn.c_proj': 'self_attn.o_proj', 'mlp.c_proj': 'mlp.down_proj',
             'attn.q_norm': 'self_attn.q_norm', 'attn.k_norm': 'self_attn.k_norm',
             'mlp.shared_gate': 'mlp.shared_expert_gate'}
    granite = kind.startswith('granitemoe')
    moe = 'block_sparse_moe.' if granite else 'mlp.'
    moe_names = {'router.gate.weight': f'{moe}router.weight' if granite else f'{moe}gate.weight',
                 'experts.c_fc': f'{moe}experts.gate_up_proj',
                 'experts.c_proj': f'{moe}experts.down_proj',
                 'shared.c_fc': 'shared_mlp.input_linear.weight',
                 'shared.c_proj': 'shared_mlp.output_linear.weight'}
    for k, v in sd.items():
        m = re.fullmatch(r'transformer\.h\.(\d+)\.mlp\.'
                         r'(router\.gate\.weight|router\.expert_bias|experts\.c_\w+'
                         r'|shared\.c_\w+)', k)
        if m and m[2] == 'router.expert_bias':
            # DeepSeek-V3's correction bias: a buffer of the router
            out[f'model.layers.{m[1]}.mlp.gate.e_score_correction_bias'] = v
            continue
        if m and kind in LINEAR_SHARED and m[2].startswith('shared'):
            # a shared expert held as Linears: [gate; up] split
            theirs = f'model.layers.{m[1]}.mlp.{LINEAR_SHARED[kind]}.'
            if m[2] == 'shared.c_fc':
                out[theirs + 'gate_proj.weight'], out[theirs + 'up_proj.weight'] = v[0].chunk(2)
            else:
                out[theirs + 'down_proj.weight'] = v[0]
            continue
        if m:
            # MoE: experts in the same stacked layout ([gate; up] rows
            # as gate_up_proj); one shared MLP
            out[f'model.layers.{m[1]}.{moe_names[m[2]]}'] = v[0] if m[2].startswith('shared') else v
            continue
        m = re.fullmatch(r'transformer\.h\.(\d+)\.(.+)\.(weight|bias)', k)
        if not m:
            continue
        i, name, kind_ = m.groups()
        theirs = f'model.layers.{i}.'
        if name == 'mlp.c_fc':
            # dense llama MLP: [gate; up] in one matrix
            gate, up = v.chunk(2)
            out[f'{theirs}mlp.gate_proj.{kind_}'], out[f'{theirs}mlp.up_proj.{kind_}'] = gate, up
        else:
            # an unmapped name: native_model says so
            out[f'{theirs}{names.get(name, "unmapped." + name)}.{kind_}'] = v
    return out


def native_model(model, kind, eot):
    """the transformers model of a native export, holding our weights (every parameter covered)"""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_config(hf_config(model.config, kind, eot), dtype=torch.float32)
    sd, theirs = hf_state_dict(model, kind), hf.state_dict()
    tied = model.config.tie_embeddings
    if kind == 'gpt2' and not model.config.bias:
        # GPT-2 always has biases: ours are zero
        sd |= {k: torch.zeros_like(v) for k, v in theirs.items()
               if k.endswith('.bias') and k not in sd}
    if tied:
        # transformers ties it to the input embedding
        sd.pop('lm_head.weight')
    missing = [k for k in theirs if k not in sd and not (tied and k == 'lm_head.weight')]
    unexpected = [k for k in sd if k not in theirs]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto {type(hf).__name__}: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for k, v in sd.items():
            assert theirs[k].shape == v.shape, \
                f"{k}: theirs {tuple(theirs[k].shape)} vs ours {tuple(v.shape)}"
            theirs[k].copy_(v)
    return hf

# -----------------------------------------------------------------------------
# remote code: our model.py and moe.py, imported by a PreTrainedModel subclass

MODELING = '''"""
A Hugging Face wrapper around nanoMoE-lab's GPT, written by export.py. nanomoe_model.py and
nanomoe_moe.py are the project's model.py and moe.py as they were at export time (only the import
between them made relative), so this model computes exactly what the checkpoint computed. Load with
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
Inference: no key/value cache in this wrapper (every forward runs the whole sequence), right
padding only.
"""
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4
    from transformers import PretrainedConfig as PreTrainedConfig

from .nanomoe_model import GPT, GPTConfig


class NanoMoEConfig(PreTrainedConfig):
    model_type = 'nanomoe'

    def __init__(self, gpt=None, **kwargs):
        # the GPTConfig arguments of model.py
        self.gpt = dict(gpt or {})
        for key, name in (('vocab_size', 'vocab_size'), ('hidden_size', 'n_embd'),
                          ('num_hidden_layers', 'n_layer'), ('num_attention_heads', 'n_head'),
                          ('max_position_embeddings', 'block_size')):
            kwargs.setdefault(key, self.gpt.get(name))
        # both matrices are in the file; GPT ties them itself
        kwargs.setdefault('tie_word_embeddings', False)
        super().__init__(**kwargs)


class NanoMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoMoEConfig
    base_model_prefix = 'model'
    _no_split_modules = ['Block']
    # router math is float32 (moe.py), also when loaded with dtype=bfloat16 / float16
    _keep_in_fp32_modules = _keep_in_fp32_modules_strict = ['router']

    def __init__(self, config):
        super().__init__(config)
        self.model = GPT(GPTConfig(**config.gpt))
        self.post_init()

    def _init_weights(self, module):
        pass  # GPT initialises itself; from_pretrained overwrites every parameter

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers builds the model on the meta device and loads the file; the buffers that GPT
        computes instead of storing (rotary tables, router offsets, counters) are then taken from a
        freshly built GPT"""
        model = super().from_pretrained(*args, **kwargs)
        with torch.device('cpu'):
            fresh = GPT(GPTConfig(**model.config.gpt))
        stored = set(model.model.state_dict())
        with torch.no_grad():
            for name, buf in fresh.named_buffers():
                if name not in stored:
                    model.model.get_buffer(name).copy_(buf)
        return model

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        # a causal model ignores right padding; left padding would shift positions
        if attention_mask is not None:
            m = attention_mask.to(torch.long)
            if (m[:, 1:] > m[:, :-1]).any():
                raise ValueError('left padding is not supported by this model: pad on the right')
        logits, _ = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return dict(input_ids=input_ids[:, -self.config.gpt['block_size']:])
'''


def embedded_source(name):
    """model.py or moe.py with its imports of the other made relative; any other import of a
    repository file refused"""
    text = (REPO / f'{name}.py').read_text(encoding='utf-8')
    local = {p.stem for p in REPO.glob('*.py')}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods = [node.module]
        else:
            mods = []
        for mod in mods:
            if (mod.split('.')[0] in local
                    and not (isinstance(node, ast.ImportFrom) and mod in ('model', 'moe'))):
                raise ValueError(f"{name}.py imports {mod} in a form export.py cannot embed "
                                 f"(only 'from model "
                                 f"import' and 'from moe import'): update export.embedded_source")
    return re.sub(r'^from (model|moe) import', r'from .nanomoe_\1 import', text, flags=re.MULTILINE)


def write_remote(model, folder, eot):
    import transformers
    from safetensors.torch import save_file
    for name in ('model', 'moe'):
        (folder / f'nanomoe_{name}.py').write_text(embedded_source(name), encoding='utf-8')
    (folder / 'modeling_nanomoe.py').write_text(MODELING, encoding='utf-8')
    config = dict(model_type='nanomoe', architectures=['NanoMoEForCausalLM'],
                  auto_map=dict(AutoConfig='modeling_nanomoe.NanoMoEConfig',
                                AutoModelForCausalLM='modeling_nanomoe.NanoMoEForCausalLM'),
                  gpt=asdict(model.config), vocab_size=model.config.vocab_size,
                  tie_word_embeddings=False,
                  bos_token_id=eot, eos_token_id=eot, dtype='float32',
                  transformers_version=transformers.__version__)
    (folder / 'config.json').write_text(json.dumps(config, indent=2))
    # cloned: tied weights are saved twice, as safetensors wants
    sd = {f'model.{k}': v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / 'model.safetensors', metadata=dict(format='pt'))

# -----------------------------------------------------------------------------
# tokenizers

def gpt2_tokenizer():
    """GPT-2's tokenizer for transformers from tiktoken's own files
    (its cache, TIKTOKEN_CACHE_DIR, works offline)"""
    from tiktoken.load import read_file_cached
    from transformers import GPT2TokenizerFast
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    vocab = read_file_cached(base + 'encoder.json',
                             '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783')
    merges = read_file_cached(base + 'vocab.bpe',
                              '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5')
    with tempfile.TemporaryDirectory() as d:
        Path(d, 'vocab.json').write_bytes(vocab)
        Path(d, 'merges.txt').write_bytes(merges)
        # file names, not keywords: transformers 4.x and 5.x
        return GPT2TokenizerFast.from_pretrained(d, model_max_length=1024)


def char_tokenizer(chars):
    """one token per character, ids as meta.json's vocabulary; an
    unknown character is an error, as in prepare.py"""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    # every character a piece, joined without spaces
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def hf_tokenizer(spec, chars):
    if spec == 'gpt2':
        return gpt2_tokenizer()
    if spec == 'char':
        return char_tokenizer(chars)
    from transformers import AutoTokenizer
    path = spec.split(':', 1)[1]
    if spec.startswith('gguf:'):
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or '.',
                                             gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)

# -----------------------------------------------------------------------------
# export

def export(run_dir, out_dir, remote_code=False, tokenizer=None):
    """run_dir/ckpt.pt -> out_dir (built in a temporary folder,
    renamed at the end); returns a summary line.
    ValueError (one line: the file and the fix) when out_dir exists or
    the checkpoint cannot be loaded"""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir} exists: choose another --out_dir or remove it first")
    model, ckpt = load_model(run_dir)
    model.eval()
    kind = None if remote_code else native_arch(model.config)
    spec, meta = tokenizer_spec(ckpt, tokenizer)
    chars = meta and meta.get('chars')
    notes, tok, eot = [], None, None
    if spec is None:
        notes.append("no tokenizer: the checkpoint names none "
                     "and its data set's meta.json is not here (pass --tokenizer)")
    elif spec == 'char' and not chars:
        notes.append("no tokenizer: a character-level run's vocabulary "
                     "is in its data set's meta.json, which is not here")
    else:
        tok = hf_tokenizer(spec, chars)
        encode, _, _, eot = load_tokenizer(spec, chars)
        probe = ''.join(ch for ch in PROBE if spec != 'char' or ch in chars)
        if tok.encode(probe, add_special_tokens=False) != encode(probe):
            notes.append(f"warning: the exported tokenizer encodes a probe text "
                         f"differently from {spec}")
    from transformers import GenerationConfig
    with atomic_dir(out_dir) as tmp:
        if kind:
            native_model(model, kind, eot).save_pretrained(tmp)
        else:
            write_remote(model, tmp, eot)
        if tok is not None:
            tok.save_pretrained(tmp)
        GenerationConfig(bos_token_id=eot, eos_token_id=eot).save_pretrained(tmp)
    how = f"native {kind}" if kind else "remote code (trust_remote_code=True)"
    c = model.config
    summary = (f"exported {run_dir} ({c.arch}, router {c.router}) -> {out_dir}: {how}, "
               f"tokenizer {spec if tok is not None else 'none'}")
    return '\n'.join(notes + [summary])


def main(argv=None):
    with errors('export.py'):
        config, _ = parse(SETTINGS, sys.argv[1:] if argv is None else argv, positional='run',
                          limits=LIMITS)
        if len(config['run']) != 1:
            raise ValueError(f"give one checkpoint folder (a folder holding ckpt.pt), "
                             f"not {len(config['run'])}: "
                             f"python export.py out/RUN --out_dir hf/RUN")
        if not config['out_dir']:
            raise ValueError("--out_dir is required: the Hugging Face folder to create, "
                             "e.g. --out_dir hf/RUN")
        print(export(config['run'][0], config['out_dir'], config['remote_code'],
                     config['tokenizer'] or None))


if __name__ == '__main__':
    main()
