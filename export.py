"""
Export a checkpoint folder (ckpt.pt from train.py or upcycle.py) to a Hugging Face folder that
transformers.AutoModelForCausalLM.from_pretrained loads: config.json, model.safetensors, the tokenizer files
and generation_config.json.

    python export.py out/RUN --out_dir hf/RUN
    python export.py out/RUN --out_dir hf/RUN --remote_code     # our own code even where a native class is exact

Native architectures, used where transformers computes exactly our function (tests/test_export.py compares
the logits of each, loaded back by from_pretrained, with ours):
- dense gpt2  -> GPT2LMHeadModel (bias=False exports as zero biases)
- dense llama -> LlamaForCausalLM
- llama, router softmax with renorm, every layer MoE, no shared experts, dropless, routed_scale 1, no biases
              -> MixtralForCausalLM (transformers' MixtralTopKRouter: softmax, top-k, renorm)
- the same with shared experts (shared_scale 1) -> GraniteMoeSharedForCausalLM (softmax over the top-k logits,
              which equals the renormalised top-k probabilities; an ungated shared SwiGLU MLP; its embedding,
              residual, attention and logit multipliers set to what Llama does)
Everything else (every other router and option, gpt2-flavour MoE) is exported with remote code
(auto_map, trust_remote_code=True): the folder holds modeling_nanomoe.py (a PreTrainedModel subclass and its
own config class) next to verbatim copies of this repository's model.py and moe.py, imported by it. The copies
are the code the checkpoint runs on today, so every router, present and future, is exact by construction; a
second transcription of the router math would drift from moe.py as routers change. The only edit is the one
import line between the two files (`from moe import` -> `from .nanomoe_moe import`), which transformers needs
to bring both files along; export.py refuses a model.py or moe.py that imports any other file of this repository.

Tokenizer: the one the checkpoint names (or its data set's meta.json): gpt2 -> GPT2TokenizerFast built from
tiktoken's own BPE files (offline: TIKTOKEN_CACHE_DIR=../shared/data/gpt2/tiktoken_cache); hf:/gguf: -> that
model's tokenizer; char -> a character-level tokenizer (one token per character, meta.json's vocabulary). The
exported tokenizer is checked against ours on a probe text, and any difference is printed.
"""
import argparse
import ast
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from checkpoint import load_model
from prepare import load_tokenizer
from checkpoint import tokenizer_spec

REPO = Path(__file__).resolve().parent
PROBE = "Hello world! It's 2026, naïve café.\nFIRST CITIZEN:\tWe are accounted poor citizens."

# -----------------------------------------------------------------------------
# which architecture: a native transformers class where it is exact, else remote code

MAPPED = {'arch', 'block_size', 'vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'mlp_hidden', 'bias',
          'tie_embeddings', 'rope_theta', 'norm_eps', 'router', 'n_experts', 'top_k', 'moe_every', 'moe_first_dense',
          'expert_hidden', 'n_shared_experts', 'shared_scale', 'routed_scale', 'router_renorm', 'capacity_factor',
          'router_options',  # the GPTConfig fields native_arch checks, and the ones that do not change the function:
          'dropout', 'aux_loss_coef', 'z_loss_coef', 'balance_scope', 'expert_impl', 'ep_size'}


def native_arch(c):
    """'gpt2', 'llama', 'mixtral' or 'granitemoeshared' where transformers has exactly this model, else None.
    Any other GPTConfig field away from its default (an option added later: a gated shared expert, forced
    balance, ...) means remote code, which is exact whatever the option does."""
    if any(getattr(c, f.name) != f.default for f in fields(c) if f.name not in MAPPED):
        return None
    if c.router == 'dense':
        return c.arch
    softmax_renorm = (c.arch == 'llama' and c.router == 'softmax' and not c.router_options and c.router_renorm
                      and c.moe_every == 1 and c.moe_first_dense == 0 and c.capacity_factor == 0 and c.routed_scale == 1
                      and not c.bias)
    if softmax_renorm and c.n_shared_experts == 0:
        return 'mixtral'
    if softmax_renorm and c.shared_scale == 1:  # GraniteMoeShared: softmax of the top-k logits = renormalised top-k
        return 'granitemoeshared'              # probabilities, plus an ungated shared SwiGLU MLP
    return None


def hf_config(c, kind, eot):
    """the transformers config of a native export"""
    from transformers import GPT2Config, LlamaConfig, MixtralConfig
    if kind == 'gpt2':
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                          n_head=c.n_head, n_inner=c.mlp_hidden, activation_function='gelu_new',
                          resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                          layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
                          bos_token_id=eot, eos_token_id=eot)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, hidden_act='silu',
                  max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
                  rope_parameters=dict(rope_type='default', rope_theta=c.rope_theta), attention_dropout=c.dropout,
                  bos_token_id=eot, eos_token_id=eot)
    if kind == 'llama':
        return LlamaConfig(**common, intermediate_size=c.mlp_hidden, attention_bias=c.bias, mlp_bias=c.bias)
    if kind == 'granitemoeshared':  # its multipliers set to what Llama does
        from transformers import GraniteMoeSharedConfig
        return GraniteMoeSharedConfig(**common, intermediate_size=c.expert_hidden, num_local_experts=c.n_experts,
                                      num_experts_per_tok=c.top_k, shared_intermediate_size=c.expert_hidden * c.n_shared_experts,
                                      router_aux_loss_coef=c.aux_loss_coef, embedding_multiplier=1.0, logits_scaling=1.0,
                                      residual_multiplier=1.0, attention_multiplier=(c.n_embd // c.n_head) ** -0.5)
    return MixtralConfig(**common, intermediate_size=c.expert_hidden, num_local_experts=c.n_experts,
                         num_experts_per_tok=c.top_k, router_aux_loss_coef=c.aux_loss_coef, sliding_window=None)


def hf_state_dict(model, kind):
    """our state dict in the names (and layouts) of the native class: the inverse of upcycle.hf_state_dict"""
    sd = model.state_dict()
    if kind == 'gpt2':  # the same names; Conv1D stores (in, out)
        conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        return {k: v.t() if k.endswith(conv1d) else v for k, v in sd.items()}
    out = {'model.embed_tokens.weight': sd['transformer.wte.weight'], 'model.norm.weight': sd['transformer.ln_f.weight'],
           'lm_head.weight': sd['lm_head.weight']}
    names = {'ln_1': 'input_layernorm', 'ln_2': 'post_attention_layernorm', 'attn.q_proj': 'self_attn.q_proj',
             'attn.k_proj': 'self_attn.k_proj', 'attn.v_proj': 'self_attn.v_proj', 'attn.c_proj': 'self_attn.o_proj',
             'mlp.c_proj': 'mlp.down_proj'}  # ours -> theirs, in every layer
    moe = 'mlp.' if kind == 'mixtral' else 'block_sparse_moe.'
    moe_names = {'router.gate.weight': f'{moe}gate.weight' if kind == 'mixtral' else f'{moe}router.weight',
                 'experts.c_fc': f'{moe}experts.gate_up_proj', 'experts.c_proj': f'{moe}experts.down_proj',
                 'shared.c_fc': 'shared_mlp.input_linear.weight', 'shared.c_proj': 'shared_mlp.output_linear.weight'}
    for k, v in sd.items():
        m = re.fullmatch(r'transformer\.h\.(\d+)\.mlp\.(router\.gate\.weight|experts\.c_\w+|shared\.c_\w+)', k)
        if m:  # MoE: experts in the same stacked layout ([gate; up] rows as gate_up_proj); one shared MLP
            out[f'model.layers.{m[1]}.{moe_names[m[2]]}'] = v[0] if m[2].startswith('shared') else v
            continue
        m = re.fullmatch(r'transformer\.h\.(\d+)\.(.+)\.(weight|bias)', k)
        if not m:
            continue
        i, name, kind_ = m.groups()
        theirs = f'model.layers.{i}.'
        if name == 'mlp.c_fc':  # dense llama MLP: [gate; up] in one matrix
            gate, up = v.chunk(2)
            out[f'{theirs}mlp.gate_proj.{kind_}'], out[f'{theirs}mlp.up_proj.{kind_}'] = gate, up
        else:
            out[f'{theirs}{names.get(name, "unmapped." + name)}.{kind_}'] = v  # unmapped: native_model says so
    return out


def native_model(model, kind, eot):
    """the transformers model of a native export, holding our weights (every parameter covered)"""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_config(hf_config(model.config, kind, eot), dtype=torch.float32)
    sd, theirs = hf_state_dict(model, kind), hf.state_dict()
    if kind == 'gpt2' and not model.config.bias:  # GPT-2 always has biases: ours are zero
        sd |= {k: torch.zeros_like(v) for k, v in theirs.items() if k.endswith('.bias') and k not in sd}
    if model.config.tie_embeddings:
        sd.pop('lm_head.weight')  # transformers ties it to the input embedding
    missing = [k for k in theirs if k not in sd and not (model.config.tie_embeddings and k == 'lm_head.weight')]
    unexpected = [k for k in sd if k not in theirs]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto {type(hf).__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for k, v in sd.items():
            assert theirs[k].shape == v.shape, f"{k}: theirs {tuple(theirs[k].shape)} vs ours {tuple(v.shape)}"
            theirs[k].copy_(v)
    return hf

# -----------------------------------------------------------------------------
# remote code: our model.py and moe.py, imported by a PreTrainedModel subclass

MODELING = '''"""
A Hugging Face wrapper around nanoMoE-lab's GPT, written by export.py. nanomoe_model.py and nanomoe_moe.py are the
project's model.py and moe.py as they were at export time (only the import between them made relative), so this
model computes exactly what the checkpoint computed. Load with
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
Inference: no key/value cache in this wrapper (every forward runs the whole sequence), right padding only.
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
        self.gpt = dict(gpt or {})  # the GPTConfig arguments of model.py
        for key, name in (('vocab_size', 'vocab_size'), ('hidden_size', 'n_embd'), ('num_hidden_layers', 'n_layer'),
                          ('num_attention_heads', 'n_head'), ('max_position_embeddings', 'block_size')):
            kwargs.setdefault(key, self.gpt.get(name))
        kwargs.setdefault('tie_word_embeddings', False)  # both matrices are in the file; GPT ties them itself
        super().__init__(**kwargs)


class NanoMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoMoEConfig
    base_model_prefix = 'model'
    _no_split_modules = ['Block']
    _keep_in_fp32_modules = _keep_in_fp32_modules_strict = ['router']  # router math is float32 (moe.py), also when
                                                                      # loaded with dtype=bfloat16 / float16

    def __init__(self, config):
        super().__init__(config)
        self.model = GPT(GPTConfig(**config.gpt))
        self.post_init()

    def _init_weights(self, module):
        pass  # GPT initialises itself; from_pretrained overwrites every parameter

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers builds the model on the meta device and loads the file; the buffers that GPT computes
        instead of storing (rotary tables, router offsets, counters) are then taken from a freshly built GPT"""
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
        if attention_mask is not None:  # a causal model ignores right padding; left padding would shift positions
            m = attention_mask.to(torch.long)
            if (m[:, 1:] > m[:, :-1]).any():
                raise ValueError('left padding is not supported by this model: pad on the right')
        logits, _ = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return dict(input_ids=input_ids[:, -self.config.gpt['block_size']:])
'''


def embedded_source(name):
    """model.py or moe.py with its imports of the other made relative; any other import of a repository file refused"""
    text = (REPO / f'{name}.py').read_text(encoding='utf-8')
    local = {p.stem for p in REPO.glob('*.py')}
    for node in ast.walk(ast.parse(text)):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for mod in mods:
            if mod.split('.')[0] in local and not (isinstance(node, ast.ImportFrom) and mod in ('model', 'moe')):
                raise ValueError(f"{name}.py imports {mod} in a form export.py cannot embed (only 'from model import' "
                                 f"and 'from moe import'): update export.embedded_source")
    return re.sub(r'^from (model|moe) import', r'from .nanomoe_\1 import', text, flags=re.MULTILINE)


def write_remote(model, folder, eot):
    from safetensors.torch import save_file
    for name in ('model', 'moe'):
        (folder / f'nanomoe_{name}.py').write_text(embedded_source(name), encoding='utf-8')
    (folder / 'modeling_nanomoe.py').write_text(MODELING, encoding='utf-8')
    import transformers
    config = dict(model_type='nanomoe', architectures=['NanoMoEForCausalLM'],
                  auto_map=dict(AutoConfig='modeling_nanomoe.NanoMoEConfig',
                                AutoModelForCausalLM='modeling_nanomoe.NanoMoEForCausalLM'),
                  gpt=asdict(model.config), vocab_size=model.config.vocab_size, tie_word_embeddings=False,
                  bos_token_id=eot, eos_token_id=eot, dtype='float32', transformers_version=transformers.__version__)
    (folder / 'config.json').write_text(json.dumps(config, indent=2))
    sd = {f'model.{k}': v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # clone: tied ones too
    save_file(sd, folder / 'model.safetensors', metadata=dict(format='pt'))

# -----------------------------------------------------------------------------
# tokenizers

def gpt2_tokenizer():
    """GPT-2's tokenizer for transformers from tiktoken's own files (its cache, TIKTOKEN_CACHE_DIR, works offline)"""
    from tiktoken.load import read_file_cached
    from transformers import GPT2TokenizerFast
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    vocab = read_file_cached(base + 'encoder.json', '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783')
    merges = read_file_cached(base + 'vocab.bpe', '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5')
    with tempfile.TemporaryDirectory() as d:
        Path(d, 'vocab.json').write_bytes(vocab)
        Path(d, 'merges.txt').write_bytes(merges)
        return GPT2TokenizerFast.from_pretrained(d, model_max_length=1024)  # file names, not keywords: 4.x and 5.x


def char_tokenizer(chars):
    """one token per character, ids as meta.json's vocabulary; an unknown character is an error, as in prepare.py"""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')  # every character a piece
    tok.decoder = decoders.Fuse()  # joined without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def hf_tokenizer(spec, chars):
    if spec == 'gpt2':
        return gpt2_tokenizer()
    if spec == 'char':
        return char_tokenizer(chars)
    from transformers import AutoTokenizer
    path = spec.split(':', 1)[1]
    if spec.startswith('gguf:'):
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or '.', gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)

# -----------------------------------------------------------------------------
# export

def export(run_dir, out_dir, remote_code=False, tokenizer=None):
    """run_dir/ckpt.pt -> out_dir (written in a temporary folder, renamed at the end); returns a summary line"""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir} exists: choose another --out_dir or remove it first")
    if not Path(run_dir, 'ckpt.pt').is_file():
        raise ValueError(f"no checkpoint at {Path(run_dir, 'ckpt.pt')}: train one with train.py or make one with upcycle.py")
    try:
        model, ckpt = load_model(run_dir)
    except (ValueError, TypeError) as e:  # GPTConfig's "unknown router ..." and friends
        raise ValueError(f"cannot build the model of {run_dir}: {e}") from e
    model.eval()
    kind = None if remote_code else native_arch(model.config)
    spec, meta = tokenizer_spec(ckpt, tokenizer)
    notes, tok, eot = [], None, None
    if spec is None:
        notes.append("no tokenizer: the checkpoint names none and its data set's meta.json is not here (pass --tokenizer)")
    elif spec == 'char' and not (meta and meta.get('chars')):
        notes.append("no tokenizer: a character-level run's vocabulary is in its data set's meta.json, which is not here")
    else:
        tok = hf_tokenizer(spec, meta and meta.get('chars'))
        encode, _, _, eot = load_tokenizer(spec, meta and meta.get('chars'))
        probe = ''.join(ch for ch in PROBE if spec != 'char' or ch in meta['chars'])
        if tok.encode(probe, add_special_tokens=False) != encode(probe):
            notes.append(f"warning: the exported tokenizer encodes a probe text differently from {spec}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        if kind:
            native_model(model, kind, eot).save_pretrained(tmp)
        else:
            write_remote(model, tmp, eot)
        if tok is not None:
            tok.save_pretrained(tmp)
        from transformers import GenerationConfig
        GenerationConfig(bos_token_id=eot, eos_token_id=eot).save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    how = f"native {kind}" if kind else "remote code (trust_remote_code=True)"
    return '\n'.join(notes + [f"exported {run_dir} ({model.config.arch}, router {model.config.router}) -> {out_dir}: "
                              f"{how}, tokenizer {spec if tok is not None else 'none'}"])


def main(argv=None):
    p = argparse.ArgumentParser(description='checkpoint folder -> Hugging Face folder (from_pretrained)')
    p.add_argument('run', help='a folder holding ckpt.pt (train.py or upcycle.py)')
    p.add_argument('--out_dir', required=True, help='the Hugging Face folder to create (must not exist)')
    p.add_argument('--remote_code', action='store_true', help='export our own code even where a native class is exact')
    p.add_argument('--tokenizer', help='tokenizer spec where the checkpoint names none: gpt2, char, hf:..., gguf:...')
    args = p.parse_args(argv)
    try:
        print(export(args.run, args.out_dir, args.remote_code, args.tokenizer))
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"export.py: error: {' '.join(str(e).split())}")


if __name__ == '__main__':
    main()
