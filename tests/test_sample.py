"""
Sampling and the training artefacts that it and the plots read, against references: GPT.generate's key/value
cache against the full forward of the whole sequence (every router, both flavours); sample.py against nanoGPT's
sampling loop written out here (no cache, crop to block_size, temperature, top-k, multinomial) on a trained, a
resumed and an upcycled checkpoint; train.py's per-layer load rows against counts computed by hand; the
Weights & Biases calls through a stand-in wandb module; eval.py --plot's PNGs. Tiny models, float32, CPU.
"""
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY, config

sys.path.insert(0, str(REPO))
import moe  # noqa: E402
import sample  # noqa: E402
from checkpoint import load_model  # noqa: E402
from model import GPT, GPTConfig, LayerKV  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
RUN = [*TINY, '--max_iters=4', '--eval_interval=2', '--always_save_checkpoint=True']
FAKE_WANDB = '''import json, os
def _write(**row):
    with open(os.environ['FAKE_WANDB_OUT'], 'a') as f:
        f.write(json.dumps(row) + '\\n')
def init(project=None, name=None, config=None):
    _write(call='init', project=project, name=name, config=config)
def log(data, step=None):
    _write(call='log', data=data, step=step)
'''

# -----------------------------------------------------------------------------
# the key/value cache

CASES = [dict(arch='gpt2', router='dense'), dict(arch='llama', n_kv_head=2, bias=False, router='dense')] + [
    dict(router=r, top_k=1 if r == 'switch' else 2, **(dict(arch='llama', n_kv_head=2, bias=False) if i % 2 else {}))
    for i, r in enumerate(moe.ROUTERS)]


@pytest.mark.parametrize('kw', CASES, ids=[f"{c.get('arch', 'gpt2')}-{c['router']}" for c in CASES])
def test_kv_cache_equals_the_full_forward(kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=4, n_embd=32, n_experts=4, **kw)).eval()
    idx = torch.randint(40, (2, 29))
    with torch.no_grad():
        full = model(idx)[0]  # (2, 29, 40) the reference: one forward of the whole sequence
        cache = [LayerKV() for _ in model.transformer.h]
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 9), (9, 10), (10, 11), (11, 29))]
    assert len(cache[0]) == 29
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    prompt = idx[:, :5]  # 5 + 40 tokens: past block_size=32, where the window slides
    torch.manual_seed(1)
    cached = model.generate(prompt, 40, temperature=0.9, top_k=10)
    torch.manual_seed(1)
    plain = model.generate(prompt, 40, temperature=0.9, top_k=10, kv_cache=False)
    assert cached.tolist() == plain.tolist()

# -----------------------------------------------------------------------------
# sample.py on trained, resumed and upcycled checkpoints

@pytest.fixture(scope='module')
def runs(trainer, tmp_path_factory):
    """a trained softmax run (logging to a stand-in wandb), the same run resumed for 2 more steps, and a dense
    model of the same vocabulary upcycled to sigmoid routing"""
    import upcycle
    fake = tmp_path_factory.mktemp('fake_wandb')
    (fake / 'wandb.py').write_text(FAKE_WANDB)
    mp = pytest.MonkeyPatch()
    mp.setenv('PYTHONPATH', str(fake))
    mp.setenv('FAKE_WANDB_OUT', str(fake / 'calls.jsonl'))
    trained = trainer.run([config('softmax'), *RUN, '--wandb_log=True', '--wandb_project=proj', '--wandb_run_name=r1'])
    mp.undo()
    trained.check()
    resumed = trainer.resume(trained.out_dir, [config('softmax'), *RUN, '--max_iters=6', '--wandb_log=False']).check()
    model, ckpt = load_model(trained.out_dir)
    dense = GPT(GPTConfig(**{**ckpt['model_args'], 'router': 'dense'}))
    up = upcycle.upcycle_model(dense, dict(router='sigmoid', n_experts=4, top_k=2))
    upcycled = trainer.root / 'out' / 'upcycled'
    upcycled.mkdir(parents=True)
    torch.save(dict(model=up.state_dict(), model_args=asdict(up.config), tokenizer=ckpt['tokenizer'], iter_num=0,
                    best_val_loss=1e9, config=dict(dataset=ckpt['config']['dataset'])), upcycled / 'ckpt.pt')
    return dict(trained=trained, resumed=resumed, upcycled=upcycled, calls=fake / 'calls.jsonl')


def nanogpt_samples(model, ids, num_samples, max_new_tokens, temperature, top_k, seed):
    """nanoGPT's sample.py and GPT.generate, written out: the whole (cropped) sequence through the model per token"""
    torch.manual_seed(seed)
    out = []
    for _ in range(num_samples):
        idx = torch.tensor([ids])
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits = model(idx[:, -model.config.block_size:])[0][:, -1, :] / temperature
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float('inf')
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        out.append(idx[0].tolist())
    return out


@pytest.mark.parametrize('which', ['trained', 'resumed', 'upcycled'])
def test_sample_py_is_nanogpts_loop(runs, trainer, which, monkeypatch, capsys):
    out_dir = runs[which].out_dir if which != 'upcycled' else runs[which]
    monkeypatch.chdir(trainer.root)  # data/<dataset>/meta.json holds the character vocabulary
    (trainer.root / 'prompt.txt').write_text('ROMEO:\nBut soft')
    start = 'FILE:prompt.txt' if which == 'resumed' else 'ROMEO:'
    sample.main([f'--out_dir={out_dir}', f'--start={start}', '--num_samples=2', '--max_new_tokens=40',
                 '--temperature=0.8', '--top_k=200', '--seed=1337'])
    texts = capsys.readouterr().out.split('\n---------------\n')[:-1]
    model, ckpt = load_model(out_dir)
    meta = json.loads((trainer.root / 'data' / ckpt['config']['dataset'] / 'meta.json').read_text())
    prompt = 'ROMEO:\nBut soft' if which == 'resumed' else 'ROMEO:'
    ids = [meta['chars'].index(c) for c in prompt]
    ref = nanogpt_samples(model.eval(), ids, 2, 40, 0.8, 200, 1337)
    assert texts == [''.join(meta['chars'][i] for i in r) for r in ref]
    assert all(len(t) == len(prompt) + 40 and t.startswith(prompt) for t in texts)


def test_sample_py_temperature_0_is_greedy(runs, trainer, monkeypatch, capsys):
    """--temperature=0: the most likely token at each step (argmax of the whole cropped sequence's last logits,
    written out here), the same in every sample, with and without the cache, whatever the seed and top_k"""
    out_dir = runs['trained'].out_dir
    monkeypatch.chdir(trainer.root)
    texts = []
    for extra in (['--seed=1', '--top_k=5'], ['--seed=2', '--kv_cache=False']):
        sample.main([f'--out_dir={out_dir}', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=40',
                     '--temperature=0', *extra])
        texts += capsys.readouterr().out.split('\n---------------\n')[:-1]
    model, ckpt = load_model(out_dir)
    model.eval()
    chars = json.loads((trainer.root / 'data' / ckpt['config']['dataset'] / 'meta.json').read_text())['chars']
    idx = torch.tensor([[chars.index(c) for c in 'ROMEO:']])
    for _ in range(40):  # 6 + 40 > block_size 32: the window slides
        with torch.no_grad():
            logits = model(idx[:, -model.config.block_size:])[0][:, -1, :]
        idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    assert texts == [''.join(chars[i] for i in idx[0].tolist())] * 4


def test_sample_py_bad_input_one_line(runs, trainer, monkeypatch):
    monkeypatch.chdir(trainer.root)
    run = f"--out_dir={runs['trained'].out_dir}"
    for argv, message in [(['--out_dir=nowhere'], "out_dir='nowhere' must be a run folder, one holding ckpt.pt"),
                          ([run, '--start=~{'], 'has no token for'),
                          ([run, '--start=FILE:nowhere.txt'], 'no file nowhere.txt'),
                          ([run, '--nonesuch=1'], "unknown config key"),
                          ([run, '--temperature=-1'], r'temperature=-1.0 must be at least 0 \(--temperature\)'),
                          ([run, '--top_k=-1'], r'top_k=-1 must be at least 0 \(--top_k\)'),
                          ([run, '--num_samples=0'], r'num_samples=0 must be at least 1 \(--num_samples\)'),
                          ([run, '--max_new_tokens=-1'], r'max_new_tokens=-1 must be at least 0')]:
        with pytest.raises(ValueError, match=message):
            sample.main(argv)

# -----------------------------------------------------------------------------
# train.py's log rows, wandb, plots

def test_log_rows_hold_every_layers_load(runs):
    rows = runs['trained'].train
    assert [r['iter'] for r in rows] == [1, 2, 3, 4]  # log_interval=1
    tokens = 4 * 32 * 2  # batch_size * block_size * gradient_accumulation_steps
    for r in rows:
        load = np.array(r['layer_load'])  # (MoE layers, experts)
        assert load.shape == (2, 8) and (load.sum(1) == tokens * 2).all()  # every token's top-2 counted once
        cv = load.std(1) / load.mean(1)
        assert np.allclose(r['layer_load_cv'], cv, atol=1e-6) and math.isclose(r['load_cv'], cv.mean(), abs_tol=1e-6)


def test_wandb_gets_the_log(runs):
    calls = [json.loads(line) for line in runs['calls'].read_text().splitlines()]
    assert calls[0]['call'] == 'init' and (calls[0]['project'], calls[0]['name']) == ('proj', 'r1')
    assert calls[0]['config']['router'] == 'softmax'
    logged = {c['step']: c['data'] for c in calls[1:] if 'loss' in c['data']}
    assert {s: d['loss'] for s, d in logged.items()} == {r['iter']: r['loss'] for r in runs['trained'].train}
    assert logged[4]['load_cv/layer1'] == runs['trained'].train[-1]['layer_load_cv'][1]
    vals = {c['step']: c['data']['val_loss'] for c in calls[1:] if 'val_loss' in c['data']}
    assert vals == runs['trained'].val_losses()


def test_plots(runs, tmp_path):
    import matplotlib.image
    import eval as ev
    a, b = runs['trained'].out_dir, runs['resumed'].out_dir
    paths = ev.plot_runs([str(a), str(b)])
    assert paths[0] == Path(a).parent / f'training_{Path(a).name}_{Path(b).name}.png'
    assert Path(a, 'expert_load_training.png') in paths and Path(b, 'expert_load_training.png') in paths
    for p in paths:
        assert matplotlib.image.imread(p).shape[0] > 100
    with pytest.raises(ValueError, match='no .*log.jsonl'):
        ev.plot_runs([str(tmp_path)])
