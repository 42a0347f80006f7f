"""
export.py against references: transformers' own classes (GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM,
GraniteMoeSharedForCausalLM)
loaded from the exported folder by AutoModelForCausalLM.from_pretrained, whose logits must equal ours (1e-4);
the remote-code export of every router in moe.ROUTERS loaded the same way (trust_remote_code=True); the exported
tokenizers against tiktoken / meta.json's vocabulary; lm-eval's own `hf` model on an exported folder against
eval.py on the checkpoint. Tiny random models, float32, CPU.
"""
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / 'shared' / 'data'
os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(DATA / 'gpt2' / 'tiktoken_cache'))  # gpt2 offline
os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, str(REPO))
import export  # noqa: E402
import moe  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
TEXT = "ROMEO:\nBut soft! what light through yonder window breaks? It is the east, and Juliet is the sun."


def tiny(vocab_size=50257, **kw):
    """a tiny random model whose every parameter matters: norms, biases and routers perturbed away from their init"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias') or p.dim() == 1 or '.router.' in name:
                p.add_(torch.randn_like(p) * (0.5 if '.router.' in name else 0.1))
        for name, b in model.named_buffers():
            if name.endswith('expert_bias'):  # deepseek's balancing bias: a stored buffer that steers selection
                b.copy_(torch.randn_like(b) * 0.05)
    return model.eval()


def tiny_of(config):
    """tiny()'s perturbations on a model of config"""
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias') or p.dim() == 1 or '.router.' in name:
                p.add_(torch.randn_like(p) * (0.5 if '.router.' in name else 0.1))
    return model.eval()


def save_run(folder, model, tokenizer='gpt2', config=None):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_args=asdict(model.config), tokenizer=tokenizer, iter_num=0,
                    best_val_loss=1e9, config=config or {}), folder / 'ckpt.pt')
    return folder


def exported(tmp_path, model, remote_code=False, name='run', **extra):
    run = save_run(tmp_path / name, model, **extra)
    out = tmp_path / f'hf_{name}'
    print(export.export(run, out, remote_code))
    return out


def assert_same_logits(model, folder, cls_name):
    """the folder, loaded by transformers, computes our logits; a native export carries no code"""
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=cls_name == 'NanoMoEForCausalLM').eval()
    assert type(hf).__name__ == cls_name
    if cls_name != 'NanoMoEForCausalLM':
        assert not list(folder.glob('*.py'))
    idx = torch.randint(model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{cls_name}: max |ours - transformers| = {diff:.2e} (max |logit| {ours.abs().max():.2f})")
    assert diff < 1e-4
    return hf

# -----------------------------------------------------------------------------
# native architectures

@pytest.mark.parametrize('kw', [dict(arch='gpt2', bias=True), dict(arch='gpt2', bias=False, tie_embeddings=False)])
def test_dense_gpt2_is_transformers_gpt2(tmp_path, kw):
    folder = exported(tmp_path, tiny(**kw))
    assert_same_logits(tiny(**kw), folder, 'GPT2LMHeadModel')


@pytest.mark.parametrize('kw', [dict(n_kv_head=2, bias=False), dict(bias=True, tie_embeddings=False, rope_theta=500.0)])
def test_dense_llama_is_transformers_llama(tmp_path, kw):
    model = tiny(arch='llama', **kw)
    assert_same_logits(model, exported(tmp_path, model), 'LlamaForCausalLM')


def test_softmax_renorm_llama_moe_is_mixtral(tmp_path):
    model = tiny(arch='llama', n_kv_head=2, bias=False, router='softmax', n_experts=4, top_k=2, expert_hidden=48)
    assert_same_logits(model, exported(tmp_path, model), 'MixtralForCausalLM')


def test_softmax_renorm_llama_moe_with_shared_experts_is_granitemoeshared(tmp_path):
    model = tiny(arch='llama', n_kv_head=2, bias=False, router='softmax', n_experts=4, top_k=2, expert_hidden=48,
                 n_shared_experts=2)
    assert_same_logits(model, exported(tmp_path, model), 'GraniteMoeSharedForCausalLM')


@pytest.mark.parametrize('kw', [dict(router_renorm=False), dict(n_shared_experts=1, shared_scale=0.5), dict(moe_every=2),
                                dict(routed_scale=2.0), dict(capacity_factor=1.25)])
def test_what_mixtral_cannot_compute_goes_to_remote_code(kw):
    c = GPTConfig(arch='llama', bias=False, router='softmax', n_experts=4, n_layer=2, n_head=4, n_embd=32, **kw)
    assert export.native_arch(c) is None
    assert export.native_arch(GPTConfig(arch='llama', bias=False, router='softmax', n_layer=2, n_head=4, n_embd=32)) == 'mixtral'


# a valid value away from the default of each text field export.MAPPED does not name
AWAY = dict(qk_norm='head', dense_layers='0')


def flipped(name, default):
    """a value away from a field's default (a type without one here fails the test: add it)"""
    if name in AWAY:
        return AWAY[name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + (0.5 if isinstance(default, float) else 1)
    raise AssertionError(f"no value away from {default!r} for a {type(default).__name__} field: add one")


CLASSES = dict(mixtral='MixtralForCausalLM', olmoe='OlmoeForCausalLM', qwen2_moe='Qwen2MoeForCausalLM',
               qwen3_moe='Qwen3MoeForCausalLM', granitemoe='GraniteMoeForCausalLM',
               granitemoeshared='GraniteMoeSharedForCausalLM')


def test_every_field_is_mapped_or_goes_to_remote_code(tmp_path):
    """every GPTConfig field (options added later included) is one that export.MAPPED names, or one that, away from
    its default, makes the export remote code or a native class that computes it (exported and compared here);
    each native base stays native with its defaults"""
    from dataclasses import fields
    small = dict(n_layer=2, n_head=4, n_embd=32)
    bases = {'gpt2': dict(arch='gpt2'), 'llama': dict(arch='llama', bias=False),
             'mixtral': dict(arch='llama', bias=False, router='softmax', n_experts=4),
             'granitemoeshared': dict(arch='llama', bias=False, router='softmax', n_experts=4, n_shared_experts=1)}
    for kind, base in bases.items():
        assert export.native_arch(GPTConfig(**small, **base)) == kind
    names = {f.name for f in fields(GPTConfig)}
    assert export.MAPPED <= names, export.MAPPED - names  # no stale names
    flipped_fields = []
    for f in fields(GPTConfig):
        if f.name in export.MAPPED:
            continue
        value = flipped(f.name, f.default)
        built = 0
        for base in bases.values():
            try:
                c = GPTConfig(**small, **base, **{f.name: value})
            except ValueError:
                continue
            kind = export.native_arch(c)
            if kind is not None:  # a class that has this option: it must compute our function
                name = f'{f.name}_{kind}'
                torch.manual_seed(0)
                assert_same_logits(tiny_of(c), exported(tmp_path, tiny_of(c), name=name, tokenizer=None),
                                   CLASSES[kind])
            built += 1
        assert built, f"{f.name}={value!r} builds on no native base: give the test a base where it is valid"
        flipped_fields.append(f.name)
    print(f"{len(flipped_fields)} unmapped fields flipped: {', '.join(flipped_fields)}")
    assert flipped_fields


# the router options (a router's architecture settings, not its training knobs) of the native bases, each away from
# its default with what it needs to be valid
OPTION_AWAY = dict(n_group=dict(n_group=2), topk_group=dict(n_group=2, topk_group=2),
                   score_function=dict(score_function='sqrtsoftplus'))


def test_every_router_option_is_expressed_or_goes_to_remote_code(tmp_path):
    """each option of the deepseek router (native as Solar-Open, dots1, GLM-4-MoE) away from its default: the
    native class computes our function (exported and compared here, the bias perturbed) or the export is remote
    code; softmax, the other routers native classes run, has no options"""
    assert moe.ROUTERS['softmax'].options == {}
    base = dict(arch='llama', bias=False, router='deepseek', n_experts=4, n_shared_experts=1)
    assert export.native_arch(GPTConfig(**base)) == 'solar_open'
    for name, default in moe.ROUTERS['deepseek'].options.items():
        away = OPTION_AWAY.get(name) or {name: flipped(name, default)}
        model = tiny(**base, router_options=away)
        assert model.config.router_options[name] != default
        native = export.native_arch(model.config)
        print(f"{name}={model.config.router_options[name]!r}: {native or 'remote code'}")
        cls = dict(solar_open='SolarOpenForCausalLM').get(native, 'NanoMoEForCausalLM')
        assert_same_logits(model, exported(tmp_path, model, name=name, tokenizer=None), cls)

# -----------------------------------------------------------------------------
# remote code: every router, both flavours

VARIANTS = [('cosine', dict(cosine_variant='libmoe')), ('perturbed_cosine', dict(cosine_variant='libmoe')),
            ('moepp', dict(moepp_gate_residual=False)), ('deepseek', dict(n_group=2, topk_group=1))]
ROUTER_CASES = [(r, {}) for r in moe.ROUTERS] + [(r, o) for r, o in VARIANTS  # the variants the routers still have
                                                 if r in moe.ROUTERS and set(o) <= set(moe.ROUTERS[r].options)]


@pytest.mark.parametrize('i', range(len(ROUTER_CASES)), ids=[r + ''.join(f'-{v}' for v in o.values())
                                                           for r, o in ROUTER_CASES])
def test_remote_code_export_of_every_router(tmp_path, i):
    """flavours alternate (llama with grouped-query attention and rotary tables, gpt2 with biases); shared experts
    and dense layers between MoE layers on some"""
    router, options = ROUTER_CASES[i]
    kw = dict(arch='llama', n_kv_head=2, bias=False) if i % 2 == 0 else dict(arch='gpt2', bias=True)
    kw |= dict(n_shared_experts=1) if i % 3 == 1 else dict(moe_every=2) if i % 3 == 2 else {}
    model = tiny(router=router, n_experts=4, top_k=1 if router == 'switch' else 2, router_options=options, **kw)
    assert all(getattr(model.config, 'router_options')[k] == v for k, v in options.items())
    folder = exported(tmp_path, model, remote_code=True)  # softmax on llama would be Mixtral
    assert (folder / 'nanomoe_moe.py').read_text() == (REPO / 'moe.py').read_text()  # the code, as it is
    hf = assert_same_logits(model, folder, 'NanoMoEForCausalLM')
    out = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)  # greedy, through GenerationMixin
    assert out[0].tolist() == model.generate(torch.tensor([[1, 2, 3]]), 5, top_k=1)[0].tolist()


def test_remote_code_in_bfloat16_keeps_routers_in_float32(tmp_path):
    """moe.py runs router math in float32: loaded with dtype=bfloat16 the routers stay float32 (else F.linear fails)"""
    model = tiny(arch='llama', bias=False, router='tcmoe', n_experts=4)
    folder = exported(tmp_path, model)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert {p.dtype for n, p in hf.named_parameters() if '.router.' in n} == {torch.float32}
    assert hf.model.lm_head.weight.dtype == torch.bfloat16
    idx = torch.randint(model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(idx).logits.float() - model(idx)[0]).abs().max() < 0.05  # bf16 rounding (logits ~0.8)


def test_remote_code_forced_on_a_dense_model(tmp_path):
    model = tiny(arch='llama', bias=False)
    assert_same_logits(model, exported(tmp_path, model, remote_code=True), 'NanoMoEForCausalLM')

# -----------------------------------------------------------------------------
# tokenizers

def test_gpt2_tokenizer_from_tiktoken_files(tmp_path):
    import tiktoken
    folder = exported(tmp_path, tiny())
    tok, enc = AutoTokenizer.from_pretrained(folder), tiktoken.get_encoding('gpt2')
    text = TEXT + " It's 2026, naïve café! 日本語"
    assert tok.encode(text, add_special_tokens=False) == enc.encode_ordinary(text)
    assert tok.eos_token_id == enc.eot_token == 50256
    assert (folder / 'generation_config.json').exists()


def test_char_tokenizer_reproduces_the_vocabulary(tmp_path, monkeypatch):
    chars = sorted(set((DATA / 'tinyshakespeare' / 'input.txt').read_text(encoding='utf-8')))
    (tmp_path / 'data' / 'chars').mkdir(parents=True)
    (tmp_path / 'data' / 'chars' / 'meta.json').write_text(json.dumps(dict(tokenizer='char', chars=chars)))
    monkeypatch.chdir(tmp_path)  # the run's data set is found as data/<dataset>/meta.json, as eval.py finds it
    model = tiny(vocab_size=len(chars))
    folder = exported(tmp_path, model, tokenizer='char', config=dict(dataset='chars'))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids == [chars.index(c) for c in TEXT]
    assert tok.decode(ids) == TEXT
    assert_same_logits(model, folder, 'GPT2LMHeadModel')
    monkeypatch.chdir(tmp_path / 'data')  # no data/chars/meta.json from here: no tokenizer, and one line says why
    summary = export.export(tmp_path / 'run', tmp_path / 'hf_no_vocab')
    assert "no tokenizer: a character-level run's vocabulary is in its data set's meta.json" in summary
    assert not (tmp_path / 'hf_no_vocab' / 'tokenizer.json').exists()
    assert (tmp_path / 'hf_no_vocab' / 'model.safetensors').exists()


def test_hf_tokenizer_is_the_source_models(tmp_path):
    """an upcycled Hugging Face model names hf:<folder> (gguf:<file> takes the same path through AutoTokenizer)"""
    from prepare import load_tokenizer
    from transformers import GPT2TokenizerFast
    GPT2TokenizerFast.from_pretrained(DATA / 'gpt2' / 'hf').save_pretrained(tmp_path / 'source')
    folder = exported(tmp_path, tiny(arch='llama', bias=False), tokenizer=f'hf:{tmp_path / "source"}')
    encode = load_tokenizer(f'hf:{tmp_path / "source"}')[0]
    assert AutoTokenizer.from_pretrained(folder).encode(TEXT, add_special_tokens=False) == encode(TEXT)

# -----------------------------------------------------------------------------
# the command line: bad input gets one line and no files

def export_error(*args):
    """export.py's command line, in this process: the one-line message it exits with"""
    with pytest.raises(SystemExit) as e:
        export.main(list(map(str, args)))
    assert isinstance(e.value.code, str) and '\n' not in e.value.code.strip()
    return e.value.code


def test_bad_input_one_line(tmp_path, capsys):
    assert 'must be a run folder' in export_error(tmp_path / 'nothing', '--out_dir', tmp_path / 'hf')
    run = save_run(tmp_path / 'run', tiny())
    ckpt = torch.load(run / 'ckpt.pt')
    (tmp_path / 'unknown').mkdir()
    torch.save({**ckpt, 'model_args': {**ckpt['model_args'], 'router': 'nonesuch'}}, tmp_path / 'unknown' / 'ckpt.pt')
    assert "unknown router 'nonesuch'" in export_error(tmp_path / 'unknown', '--out_dir', tmp_path / 'hf')
    (tmp_path / 'taken').mkdir()
    assert 'exists' in export_error(run, '--out_dir', tmp_path / 'taken')
    assert not (tmp_path / 'hf').exists() and list((tmp_path / 'taken').iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary folders left behind
    export.main([str(run), '--out_dir', str(tmp_path / 'hf')])  # and the good path
    assert 'native gpt2' in capsys.readouterr().out and (tmp_path / 'hf' / 'model.safetensors').exists()
    assert 'needs a value' in export_error(run, '--out_dir')
    assert '--out_dir is required' in export_error(run)
    assert 'give one checkpoint folder' in export_error(run, run, '--out_dir', tmp_path / 'hf2')
    assert 'give one checkpoint folder' in export_error('--out_dir', tmp_path / 'hf2')
    assert "unknown config key 'remote'" in export_error(run, '--out_dir', tmp_path / 'hf2', '--remote=True')
    assert not (tmp_path / 'hf2').exists()


@pytest.mark.parametrize('argv', [['{run}', '--out_dir', '{out}', '--remote_code'],
                                  ['--out_dir={out}', '--remote_code', '{run}'],
                                  ['{run}', '--out_dir', '{out}', '--remote_code=True', '--tokenizer', 'gpt2']])
def test_command_line_forms(tmp_path, capsys, argv):
    """the forms the README and the scripts use: the run folder anywhere, --key value and --key=value, a bare flag"""
    run = save_run(tmp_path / 'run', tiny())
    export.main([a.format(run=run, out=tmp_path / 'hf') for a in argv])
    out = capsys.readouterr().out
    assert 'remote code' in out and 'tokenizer gpt2' in out and (tmp_path / 'hf' / 'modeling_nanomoe.py').exists()

# -----------------------------------------------------------------------------
# lm-eval's own `hf` model on an exported folder = eval.py on the checkpoint

def test_lm_eval_hf_on_the_export_equals_eval_py(tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    import eval as ev
    model = tiny(router='sigmoid', n_experts=4, top_k=2, arch='gpt2', bias=True)  # remote code through lm-eval
    folder = exported(tmp_path, model)
    ours = ev.MoELM(*[ev.load_run(tmp_path / 'run', 'cpu')[i] for i in (0, 2)], batch_size=8)
    ref = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=8, device='cpu')
    specs, tm = ev.task_specs(['piqa', 'arc_easy'], DATA / 'tasks'), TaskManager(include_defaults=False)
    for name in specs:
        a, b = (lm_eval.simple_evaluate(model=lm, tasks=[specs[name]], task_manager=tm, limit=12)['results'][name]
                for lm in (ours, ref))
        print(name, {k: v for k, v in a.items() if k.startswith('acc')})
        for metric in ('acc,none', 'acc_norm,none'):
            assert a[metric] == b[metric], (name, metric, a[metric], b[metric])
