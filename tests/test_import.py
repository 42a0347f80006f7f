"""
Tests of upcycle.py's import of pretrained MoE models against Hugging Face transformers: for each supported
class a tiny random model (2 layers, n_embd 64, a few experts, norms and correction biases randomised so that a
wrong mapping shows) is saved with save_pretrained, imported, and must give transformers' logits and greedy
generation; each architecture out of reach is refused in one line naming the part. fp32, CPU.

    python -m pytest tests/test_import.py -v
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: upcycle.py, model.py, moe.py
import upcycle  # noqa: E402
from checkpoint import load_model  # noqa: E402

torch.set_num_threads(1)
V = 101
IDX = torch.randint(V, (2, 24), generator=torch.Generator().manual_seed(0))
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
              bos_token_id=0, eos_token_id=0)
DEEPSEEK = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
# (config class, its arguments beyond COMMON): each one's own options away from the plain case
CASES = {
    'mixtral': ('MixtralConfig', dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    'olmoe': ('OlmoeConfig', dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    'qwen2_moe': ('Qwen2MoeConfig', dict(intermediate_size=48, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                         mlp_only_layers=[0], qkv_bias=True, norm_topk_prob=False)),
    'qwen3_moe': ('Qwen3MoeConfig', dict(intermediate_size=48, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, head_dim=24, norm_topk_prob=True)),
    'granitemoe': ('GraniteMoeConfig', dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                            embedding_multiplier=2.0, attention_multiplier=0.2,
                                            residual_multiplier=0.5, logits_scaling=3.0)),
    'granitemoeshared': ('GraniteMoeSharedConfig', dict(intermediate_size=32, num_local_experts=4,
                                                        num_experts_per_tok=2, shared_intermediate_size=40,
                                                        embedding_multiplier=2.0, attention_multiplier=0.2,
                                                        residual_multiplier=0.5, logits_scaling=3.0)),
    'solar_open': ('SolarOpenConfig', dict(DEEPSEEK, head_dim=24)),
    'dots1': ('Dots1Config', dict(DEEPSEEK, intermediate_size=48, first_k_dense_replace=1, norm_topk_prob=False)),
    # rotary on half of each head (its default partial_rotary_factor)
    'glm4_moe': ('Glm4MoeConfig', dict(DEEPSEEK, intermediate_size=48, first_k_dense_replace=1, attention_bias=True,
                                       use_qk_norm=True)),
    # transformers' Glm4MoeForCausalLM under other configs (full rotary): Param2 with qkv biases, Sarvam without
    'param2moe': ('Param2MoeConfig', dict(DEEPSEEK, intermediate_size=48, first_k_dense_replace=1, head_dim=16,
                                          attention_bias=True, use_qk_norm=True)),
    'sarvam_moe': ('SarvamMoEConfig', dict(DEEPSEEK, intermediate_size=48, first_k_dense_replace=1, head_dim=16,
                                           use_qk_norm=True)),
    # sigmoid, correction bias on the MoE block, no groups; rotary on 12 of 16 dims
    'minimax_m2': ('MiniMaxM2Config', dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                           rotary_dim=12)),
    # sigmoid, correction bias on the MoE block, routed output x 2.8, a dense first layer, per-head qk-norm
    'hy_v3': ('HYV3Config', dict(intermediate_size=48, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 num_shared_experts=1, router_scaling_factor=2.8, mlp_layer_types=['dense', 'sparse'])),
}
DEEPSEEK_STYLE = ('solar_open', 'dots1', 'glm4_moe', 'param2moe', 'sarvam_moe', 'minimax_m2', 'hy_v3')
# the classes whose first layer is dense in CASES
FIRST_DENSE = ('qwen2_moe', 'dots1', 'glm4_moe', 'param2moe', 'sarvam_moe', 'hy_v3')


def randomised(hf):
    """norm weights and biases away from 1 and 0, correction biases (buffers) away from 0"""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            if t.dim() == 1 and 'inv_freq' not in name:
                t.add_(0.2 * torch.randn(t.shape, generator=gen))
    return hf.eval()


def tiny_hf(kind, folder, **kw):
    """a random transformers MoE of CASES[kind], saved in folder"""
    import transformers
    cls, args = CASES[kind]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**{**COMMON, **args, **kw})
    hf = randomised(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope='module', params=list(CASES))
def source(request, tmp_path_factory):
    """(kind, the transformers model, its folder, our import)"""
    folder = tmp_path_factory.mktemp(request.param)
    hf = tiny_hf(request.param, folder)
    model, spec, _ = upcycle.load_source(str(folder))
    return request.param, hf, folder, model.eval()


def test_logits_equal_transformers(source):
    kind, hf, _, model = source
    with torch.no_grad():
        ours, theirs = model(IDX)[0], hf(IDX).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{kind}: max |ours - transformers| = {diff:.2e} (max |logit| {theirs.abs().max():.2f})")
    assert theirs.abs().max() > 0.5 and diff < 1e-5


def test_greedy_generation_equals_transformers(source):
    _, hf, _, model = source
    prompt = IDX[:, :6]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False)
    ours = model.generate(prompt, 10, top_k=1)
    assert torch.equal(ours, theirs)


def correction_bias(hf):
    """layer 1's e_score_correction_bias, on the router or (MiniMax-M2) on the MoE block"""
    mlp = hf.model.layers[1].mlp
    on_block = hf.config.model_type in ('minimax_m2', 'hy_v3')
    return mlp.e_score_correction_bias if on_block else mlp.gate.e_score_correction_bias


def test_each_class_keeps_its_routing(source):
    """the options that make each class what it is (a reference: the transformers config)"""
    kind, hf, _, model = source
    c, cfg = model.config, hf.config
    assert c.router == ('deepseek' if kind in DEEPSEEK_STYLE else 'softmax')
    assert c.top_k == cfg.num_experts_per_tok
    assert c.router_renorm == getattr(cfg, 'norm_topk_prob', True)
    assert [c.is_moe(i) for i in range(2)] == [kind not in FIRST_DENSE, True]
    assert c.rotary_dim == dict(glm4_moe=8, minimax_m2=12).get(kind, 0)
    assert c.qkv_bias == (kind in ('qwen2_moe', 'glm4_moe', 'param2moe'))
    if kind in DEEPSEEK_STYLE:
        bias = correction_bias(hf)
        assert bias.abs().min() > 0 and torch.equal(model.transformer.h[1].mlp.router.expert_bias, bias)


# the native class each import is exported as (None: remote code): its own, or the first of export.native_arch's that
# computes the same function (Sarvam's config, full rotary without biases, is dots1's)
NATIVE = dict(mixtral='MixtralForCausalLM', olmoe='OlmoeForCausalLM', qwen2_moe='Qwen2MoeForCausalLM',
              qwen3_moe='Qwen3MoeForCausalLM', granitemoe='GraniteMoeForCausalLM',
              granitemoeshared='GraniteMoeSharedForCausalLM', solar_open='SolarOpenForCausalLM',
              dots1='Dots1ForCausalLM', glm4_moe='Glm4MoeForCausalLM', param2moe='Glm4MoeForCausalLM',
              sarvam_moe='Dots1ForCausalLM')


def test_export_round_trip(source, tmp_path):
    """the import exported (its native class where exact, else remote code) and loaded back by transformers gives
    the source's logits; the correction bias, a buffer other exports lose, is kept"""
    import export
    from transformers import AutoModelForCausalLM
    kind, hf, _, model = source
    upcycle.save_upcycled(str(tmp_path / 'run'), model, None, {}, 'test')
    print(export.export(str(tmp_path / 'run'), tmp_path / 'hf'))
    native = NATIVE.get(kind)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', trust_remote_code=native is None).eval()
    assert type(back).__name__ == (native or 'NanoMoEForCausalLM')
    with torch.no_grad():
        torch.testing.assert_close(back(IDX).logits, hf(IDX).logits, atol=1e-5, rtol=0)
    if kind in DEEPSEEK_STYLE:
        bias = correction_bias(hf)
        kept = back.model.transformer.h[1].mlp.router.expert_bias if native is None else correction_bias(back)
        assert bias.abs().min() > 0 and torch.equal(kept, bias)


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / 'upcycle.py'), *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_import_fine_tunes_with_train_py(tmp_path, capsys):
    """an OLMoE folder imported (a setting it fixes given: ignored, said so), then a few steps of train.py from
    the checkpoint on data prepared with the folder's tokenizer: the loss goes down"""
    import prepare
    from conftest import SHAKESPEARE, read_log
    hf = tiny_hf('olmoe', tmp_path / 'hf', vocab_size=257, max_position_embeddings=256)
    byte_tokenizer().save_pretrained(tmp_path / 'hf')
    upcycle.main([f'--init_from={tmp_path / "hf"}', f'--out_dir={tmp_path / "olmoe"}', '--n_experts=16'])
    out = capsys.readouterr().out
    assert "the import computes the transformers model's function" in out and "ignoring n_experts=16" in out
    model, ckpt = load_model(str(tmp_path / 'olmoe'))
    assert ckpt['tokenizer'] == f'hf:{tmp_path / "hf"}' and model.config.n_experts == 4
    idx = IDX % 257
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    text = tmp_path / 'text.txt'
    text.write_text(SHAKESPEARE.read_text()[:20000])
    prepare.main([str(text), f'--tokenizer=hf:{tmp_path / "hf"}', '--name=bytes', f'--out_root={tmp_path / "data"}'])
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), f'--init_from={tmp_path / "olmoe"}', '--dataset=bytes',
                        f'--out_dir={tmp_path / "ft"}', '--max_iters=6', '--eval_interval=6', '--eval_iters=2',
                        '--batch_size=4', '--block_size=64', '--gradient_accumulation_steps=1', '--device=cpu',
                        '--dtype=float32', '--learning_rate=1e-3', '--warmup_iters=1', '--log_interval=1'],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    train, evals = read_log(tmp_path / 'ft')
    assert len(train) == 6 and evals[-1]['val_loss'] < evals[0]['val_loss']


# every architecture out of reach in ../shared/reference/hf_moe_import.md (sections 2 and 3), under transformers'
# model_type names (a composite config and its text model both), and the part its one line must name
REFUSED = {
    **dict.fromkeys(['deepseek_v2', 'deepseek_v3', 'deepseek_v32', 'deepseek_v4', 'glm4_moe_lite', 'glm_moe_dsa',
                     'mistral4', 'longcat_flash', 'axk1', 'axk2', 'dots3_note', 'dots3_note_text', 'hy_v4',
                     'kimi_linear', 'sarvam_mla'], 'MLA'),
    **dict.fromkeys(['jamba', 'granitemoehybrid', 'nemotron_h', 'qwen3_next', 'qwen3_5_moe', 'qwen3_5_moe_text',
                     'qwen4_exp', 'qwen4_exp_text', 'lara_mini', 'lfm2_moe', 'minimax', 'bailing_hybrid', 'zaya',
                     'inkling_text', 'inkling2', 'inkling2_text', 'inkling2_loop', 'inkling2_loop_text'], 'hybrid'),
    **dict.fromkeys(['minicpm5_moe', 'afmoe', 'beam', 'laguna'], 'gated attention'),
    'cohere2_moe': 'parallel', 'llama4': "experts' input", 'llama4_text': "experts' input",
    **dict.fromkeys(['doge', 'ergo', 'flint', 'gemma4', 'gemma4_text', 'granitemoe_swa', 'jetmoe', 'mimo_v2_flash',
                     'minimax_m3_vl', 'minimax_m3_vl_text'], 'attention'),
    # within reach of options model.py lacks
    'phimoe': 'sparsemixer', 'dbrx': 'LayerNorm', 'gpt_oss': 'sinks', 'ernie4_5_moe': 'correction bias',
    'aria_text': 'transposed', 'flex_olmo': 'post-norm', 'kolibri1': 'NoPE', 'kolibri1_1': 'NoPE',
    'hunyuan_v1_moe': 'after the rotary', 'exaone_moe': 'sliding-window', 'mellum': 'sliding-window'}


def test_every_transformers_moe_is_imported_or_refused():
    """each causal LM of the installed transformers whose config declares experts is a class imported above (CASES)
    or refused below (REFUSED), so that its import gives its logits or one line naming the part it lacks"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def declares_experts(cls):
        names = set(getattr(cls, '__dataclass_fields__', {})) | set(vars(cls))
        return any('expert' in n.lower() for n in names) or any(
            declares_experts(sub) for sub in getattr(cls, 'sub_configs', {}).values() if isinstance(sub, type))

    moe_types = {k for k in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if k in CONFIG_MAPPING
                 and declares_experts(CONFIG_MAPPING[k])}
    assert {'mixtral', 'olmoe', 'deepseek_v3', 'jamba'} <= moe_types
    assert not moe_types - set(CASES) - set(REFUSED), sorted(moe_types - set(CASES) - set(REFUSED))


@pytest.mark.parametrize('kind', list(REFUSED))
def test_out_of_reach_refused_in_one_line(kind):
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.for_model(kind)
    except (KeyError, ValueError):
        pytest.skip(f"transformers has no {kind}")
    with pytest.raises(ValueError, match=REFUSED[kind]) as e:
        upcycle.hf_model_args(cfg)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('kind, kw, part', [('glm4_moe', dict(rope_parameters=dict(rope_type='linear', factor=2.0,
                                                                             rope_theta=1e4)), 'rope scaling'),
                                            ('qwen3_moe', dict(attention_bias=True), 'output projection'),
                                            ('mixtral', dict(sliding_window=16), 'sliding window')])
def test_options_out_of_reach_refused(kind, kw, part, tmp_path):
    """a supported class with an option model.py lacks: refused before anything is written"""
    tiny_hf(kind, tmp_path / 'hf', **kw)
    with pytest.raises(ValueError, match=part):
        upcycle.main([f'--init_from={tmp_path / "hf"}', f'--out_dir={tmp_path / "out"}'])
    assert not (tmp_path / 'out').exists()


def test_cli_refusal_is_one_line(tmp_path):
    tiny_hf('olmoe', tmp_path / 'hf', clip_qkv=8.0)
    r = run(f'--init_from={tmp_path / "hf"}', f'--out_dir={tmp_path / "out"}')
    assert r.returncode != 0 and 'clip_qkv' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'out').exists()


def test_import_keeps_its_router_options(tmp_path, capsys):
    """a dots1 import given another group setting without --router: its own kept, the given one named"""
    tiny_hf('dots1', tmp_path / 'hf')
    upcycle.main([f'--init_from={tmp_path / "hf"}', '--n_group=2', '--bias_update_rate=0.5', '--top_k=4',
                  f'--out_dir={tmp_path / "out"}'])
    assert 'ignoring top_k=4, n_group=2: the MoE comes from init_from' in capsys.readouterr().out
    model, _ = load_model(str(tmp_path / 'out'))
    assert model.config.top_k == 2 and model.config.router_options == dict(
        n_group=4, topk_group=2, score_function='sigmoid', bias_update_rate=0.5, bias_recentre=False)


def test_reroute_keeps_the_experts_and_trains(tmp_path, capsys):
    """--router=deepseek on a Qwen2-MoE: every expert, the shared expert and its gate as the source's, each router
    fresh (N(0, router_init_std) from a generator seeded seed + layer, bias 0); a few AdamW steps lower the loss and
    move the correction bias"""
    import moe
    hf = tiny_hf('qwen2_moe', tmp_path / 'hf')
    upcycle.main([f'--init_from={tmp_path / "hf"}', '--router=deepseek', '--top_k=3', '--router_init_std=0.05',
                  '--bias_update_rate=0.01', f'--out_dir={tmp_path / "out"}'])
    out = capsys.readouterr().out
    assert '(re-routed from softmax)' in out and 'computes another function' in out
    model, _ = load_model(str(tmp_path / 'out'))
    c, theirs, ours = model.config, hf.model.layers[1].mlp, model.transformer.h[1].mlp
    assert (c.router, c.top_k, c.router_renorm, c.n_experts, c.dense_layers) == ('deepseek', 3, False, 4, '0')
    assert torch.equal(ours.experts.c_fc, theirs.experts.gate_up_proj)
    assert torch.equal(ours.experts.c_proj, theirs.experts.down_proj)
    assert torch.equal(ours.shared.c_proj[0], theirs.shared_expert.down_proj.weight)
    assert torch.equal(ours.shared_gate.weight, theirs.shared_expert_gate.weight)
    fresh = torch.empty(4, 64).normal_(0.0, 0.05, generator=torch.Generator().manual_seed(42 + 1))
    assert torch.equal(ours.router.gate.weight, fresh) and not ours.router.expert_bias.any()
    with torch.no_grad():  # the attention and the dense layer are the source's
        torch.testing.assert_close(model.transformer.h[0].mlp.c_proj.weight, hf.model.layers[0].mlp.down_proj.weight)
    model.train()
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    x, y = IDX[:, :-1], IDX[:, 1:]
    losses = []
    for _ in range(6):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.end_step(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0] and ours.router.expert_bias.abs().sum() > 0


def byte_tokenizer():
    """a byte-level tokenizer of 256 bytes and an end-of-text token: any text encodes"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>')


def test_docs_offline_commands_run_as_written(tmp_path, capsys):
    """docs/import.md's offline block with M = a tiny OLMoE folder holding a tokenizer, out/ and the task folder
    under absolute paths: the import, then eval.py --analyze (routing statistics and Drop-Top-1) on it"""
    import shlex
    import eval as evaluate
    from conftest import TASKS
    text = (ROOT / 'docs' / 'import.md').read_text()
    block = text.split('## Offline, from a local folder', 1)[1].split('```sh\n', 1)[1].split('```', 1)[0]
    lines = block.strip().splitlines()
    assert [line.split()[1] for line in lines] == ['upcycle.py', 'eval.py']
    folder = tmp_path / 'OLMoE-tiny'
    tiny_hf('olmoe', folder, vocab_size=257, max_position_embeddings=256)
    byte_tokenizer().save_pretrained(folder)
    mains = {'upcycle.py': upcycle.main, 'eval.py': evaluate.main}
    for line in lines:
        line = (line.replace('$M', str(folder)).replace('out/', f'{tmp_path}/out/')
                .replace('../shared/data/tasks', str(TASKS)))
        argv = shlex.split(line)
        mains[argv[1]](argv[2:])
    out = capsys.readouterr().out
    assert "the import computes the transformers model's function" in out
    result = json.loads((tmp_path / 'out' / 'olmoe_local' / 'eval.json').read_text())
    assert 'piqa' in result['tasks'] and 'piqa' in result['drop_top1']


# one class of each attention and router family (every class: test_logits_equal_transformers)
EVALUATED = ['olmoe', 'qwen2_moe', 'qwen3_moe', 'granitemoeshared', 'glm4_moe', 'hy_v3']


@pytest.mark.parametrize('kind', EVALUATED)
def test_eval_py_on_the_import_equals_lm_eval_hf(kind, tmp_path):
    """eval.py's model on the import against lm-eval's own `hf` model on the transformers source: every
    per-choice loglikelihood within 1e-4 (or 1e-6 of the largest), acc and acc_norm identical, on the first
    documents of two tasks (OLMoE, HY-V3) or of PIQA (the others)"""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    import eval as ev
    from conftest import TASKS
    hf = tiny_hf(kind, tmp_path / 'hf', vocab_size=257, max_position_embeddings=256)
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path / 'hf')
    upcycle.main([f'--init_from={tmp_path / "hf"}', f'--out_dir={tmp_path / "run"}'])
    model, _, tokenizer, spec = ev.load_run(tmp_path / 'run', 'cpu')
    assert spec == f'hf:{tmp_path / "hf"}'
    ours, ref = ev.MoELM(model, tokenizer, batch_size=5), HFLM(pretrained=hf, tokenizer=tok, batch_size=8,
                                                                 device='cpu')
    names, limit = (['piqa', 'arc_easy'], 8) if kind in ('olmoe', 'hy_v3') else (['piqa'], 5)
    specs, tm = ev.task_specs(names, TASKS), TaskManager(include_defaults=False)
    for name in names:
        a, b = (lm_eval.simple_evaluate(model=lm, tasks=[specs[name]], task_manager=tm, limit=limit)
                for lm in (ours, ref))
        lla, llb = ([[r[0][0] for r in s['resps']] for s in sorted(x['samples'][name], key=lambda s: s['doc_id'])]
                    for x in (a, b))
        assert len(lla) == limit and [len(x) for x in lla] == [len(x) for x in llb]
        diff = max(abs(x - y) for xs, ys in zip(lla, llb) for x, y in zip(xs, ys))
        scale = max(abs(y) for ys in llb for y in ys)
        print(f"{kind} {name}: max |eval.py - lm-eval hf| loglikelihood {diff:.2e} (max |ll| {scale:.0f})")
        # float32 sums over continuations of up to a few hundred byte tokens
        assert diff < max(1e-4, 1e-6 * scale)
        for metric in ('acc,none', 'acc_norm,none'):
            assert a['results'][name][metric] == b['results'][name][metric]
