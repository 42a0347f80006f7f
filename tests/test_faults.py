"""Faults and bad input (docs/training.md, "Faults and bad input"): an experiment never changes silently, a run
is never lost, every mistake gets one clear line and a non-zero exit, and nothing is written or damaged. The
references are an uninterrupted run (for resumes and fallbacks), the checkpoint's own model_args (for refused
settings), the files as they were before (for "nothing damaged"), and a second identical run (for
determinism)."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATASET, REPO, SCHEDULE, TINY, TRAIN, child_env, config

sys.path.insert(0, str(REPO))
import checkpoint as checkpoint_py  # noqa: E402
from checkpoint import load_model, save_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def config_args(name):
    return [*TINY, *map(config, name.split('+')), *SCHEDULE]


def half_args(name):
    return [*config_args(name), '--max_iters=5']  # stops at the checkpoint at 5 of the 10-step schedule


def one_line_error(r, *needles, prefix='train.py: error: '):
    """the run failed with exactly one line on stderr, starting with prefix and holding each needle"""
    assert r.rc not in (0, -999), r.out[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), r.out[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def copy_run(trainer, src, names=('ckpt.pt',)):
    """a fresh out_dir holding copies of src's files names"""
    out_dir = trainer.new_out_dir('copy')
    out_dir.mkdir(parents=True)
    for name in names:
        shutil.copy(Path(src) / name, out_dir / name)
    return out_dir


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def ckpt_of(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_losses(run, ref, iters, rel=1e-6):
    got, want = run.losses(), ref.losses()
    assert set(iters) <= set(got), f"missing steps: {sorted(got)}\n{run.out[-3000:]}"
    bad = {i: (got[i], want[i]) for i in iters if got[i] != pytest.approx(want[i], rel=rel)}
    assert not bad, f"loss differs from the uninterrupted run at {bad}"

# -----------------------------------------------------------------------------
# init_from and resume: the checkpoint's architecture, the run's own settings


def test_init_from_refuses_a_contradicting_architecture_naming_the_keys(trainer):
    ref = trainer.run(config_args('softmax')).check()
    want = ckpt_of(ref.out_dir / 'ckpt.pt')['model_args']
    assert (want['router'], want['top_k'], want['router_renorm']) == ('softmax', 2, True)
    r = trainer.run([*TINY, config('sigmoid'), f'--init_from={ref.out_dir}', '--top_k=1', '--router_renorm=False',
                     '--max_iters=2'], cache=False)
    line = one_line_error(r, "router='softmax'", "router='sigmoid'", 'top_k=2', 'top_k=1 (--top_k)',
                          'router_renorm=True', 'router_renorm=False (--router_renorm)', 'sigmoid.py')
    assert 'n_layer' not in line  # equal values given (TINY's n_layer=2, ...) are no contradiction
    assert not r.out_dir.exists()  # nothing written


def test_resume_without_the_config_file_continues_the_same_run(trainer):
    """a Switch run (capacity factor 1.25, top-1, jitter) stopped at 5 of 10 steps, resumed with no config file
    and no settings but the new max_iters: every step equals the uninterrupted run's, and config.json records what
    ran"""
    full = trainer.run(config_args('switch')).check()
    half = trainer.run(half_args('switch')).check()
    out_dir = copy_run(trainer, half.out_dir)
    r = trainer.run(['--init_from=resume', '--max_iters=10'], out_dir=out_dir, cache=False).check()
    assert sorted(r.losses()) == list(range(6, 11)), r.out
    assert_same_losses(r, full, range(6, 11))
    used = json.loads((out_dir / 'config.json').read_text())
    assert (used['router'], used['top_k'], used['capacity_factor'], used['max_iters']) == ('switch', 1, 1.25, 10)
    assert (used['n_embd'], used['dataset'], used['init_from']) == (32, DATASET, 'resume')
    assert 'warning' not in r.out.lower(), r.out  # no spurious warnings


def test_resume_changes_a_training_knob_of_the_router(trainer):
    """DeepSeek-V3's last phase: bias_update_rate 0 after a resume freezes the expert bias, which the
    uninterrupted run keeps moving"""
    full = trainer.run(config_args('deepseek')).check()
    half = trainer.run(half_args('deepseek')).check()
    r = trainer.run(['--init_from=resume', '--max_iters=10', '--bias_update_rate=0.0'],
                    out_dir=copy_run(trainer, half.out_dir), cache=False).check()
    bias = lambda path: {k: v for k, v in ckpt_of(path)['model'].items() if k.endswith('expert_bias')}
    at5, at10, full10 = bias(half.out_dir / 'ckpt.pt'), bias(r.out_dir / 'ckpt.pt'), bias(full.out_dir / 'ckpt.pt')
    assert at5 and all(torch.equal(at5[k], at10[k]) for k in at5)
    assert any(not torch.equal(at5[k], full10[k]) for k in at5)  # the reference: the bias does move at rate 1e-3
    assert ckpt_of(r.out_dir / 'ckpt.pt')['model_args']['router_options']['bias_update_rate'] == 0.0
    assert json.loads((r.out_dir / 'config.json').read_text())['bias_update_rate'] == 0.0
    assert 'warning' not in r.out.lower(), r.out


def test_resume_sets_a_training_knob_the_checkpoint_predates(trainer):
    """a checkpoint written before a knob existed (here: no bias_update_rate anywhere in it) still takes the
    given value, and the model runs what config.json records"""
    half = trainer.run(half_args('deepseek')).check()
    out_dir = copy_run(trainer, half.out_dir)
    ckpt = ckpt_of(out_dir / 'ckpt.pt')
    del ckpt['model_args']['router_options']['bias_update_rate']
    del ckpt['config']['bias_update_rate']
    torch.save(ckpt, out_dir / 'ckpt.pt')
    r = trainer.run(['--init_from=resume', '--max_iters=10', '--bias_update_rate=0.0'], out_dir=out_dir,
                    cache=False).check()
    bias = lambda path: {k: v for k, v in ckpt_of(path)['model'].items() if k.endswith('expert_bias')}
    at5, at10 = bias(half.out_dir / 'ckpt.pt'), bias(r.out_dir / 'ckpt.pt')
    assert at5 and all(torch.equal(at5[k], at10[k]) for k in at5)  # frozen: the rate 0.0 ran
    assert ckpt_of(r.out_dir / 'ckpt.pt')['model_args']['router_options']['bias_update_rate'] == 0.0
    assert json.loads((r.out_dir / 'config.json').read_text())['bias_update_rate'] == 0.0

# -----------------------------------------------------------------------------
# non-finite loss or gradient norm

POISON = '''
import runpy, sys
sys.path.insert(0, {repo!r})
import model
real, calls = model.GPT.forward, [0]

def forward(self, idx, targets=None, *args, **kwargs):
    out = list(real(self, idx, targets, *args, **kwargs))  # logits, loss (, aux with with_aux=True)
    if targets is not None and self.training:
        calls[0] += 1
        if calls[0] == {poison}:  # one micro-step of one step: its loss (and so its gradients) NaN
            out[1] = out[1] * float('nan')
    return tuple(out)

model.GPT.forward = forward
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name='__main__')
'''


@pytest.mark.parametrize('router, learned', [('deepseek', 'expert_bias'), ('remoe', 'l1_coef')])
def test_a_non_finite_step_is_skipped_whole(trainer, router, learned):
    """step 3's loss is NaN: no optimizer update, no update of what the router learns after each step (deepseek's
    bias, remoe's lambda: docs/routers.md, where the sources differ), a warning and a log row; the checkpoints
    after steps 2 and 3 are identical, and step 4 trains"""
    driver = trainer.root / 'poison_step_3.py'
    driver.write_text(POISON.format(poison=5, train=str(TRAIN), repo=str(REPO)))  # micro-step 5 = step 3's first
    args = [*TINY, config(router), '--max_iters=4', '--eval_interval=1', '--always_save_checkpoint=True',
            '--keep_checkpoints=True']
    r = trainer.run(args, script=driver, cache=False).check()
    skipped = [row for row in map(json.loads, (r.out_dir / 'log.jsonl').read_text().splitlines()) if row.get('skipped')]
    assert [(row['iter'], row['bad_steps'], row['loss']) for row in skipped] == [(3, 1, 'nan')], skipped
    assert 'warning: iter 3: non-finite loss' in r.out
    a, b = ckpt_of(r.out_dir / 'iter_2' / 'ckpt.pt'), ckpt_of(r.out_dir / 'iter_3' / 'ckpt.pt')
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    start = ckpt_of(r.out_dir / 'iter_1' / 'ckpt.pt')['model']
    moved = [k for k in a['model'] if k.endswith(learned) and not torch.equal(start[k], a['model'][k])]
    assert moved, f'{learned} did not move in step 1'  # it learns in a step that is not skipped
    for n in a['optimizer']:
        assert all(torch.equal(a['optimizer'][n][s], b['optimizer'][n][s]) for s in a['optimizer'][n]), n
    c = ckpt_of(r.out_dir / 'ckpt.pt')
    assert c['iter_num'] == 4 and any(not torch.equal(b['model'][k], c['model'][k]) for k in b['model'])
    assert math.isfinite(r.losses()[4])


def test_a_learning_rate_that_blows_up_stops_with_one_line_and_keeps_the_checkpoint(trainer):
    half = trainer.run(half_args('deepseek')).check()
    out_dir = copy_run(trainer, half.out_dir)
    r = trainer.run(['--init_from=resume', '--learning_rate=1e30',
                     '--min_lr=1e30', '--max_iters=40'], out_dir=out_dir, cache=False)
    one_line_error(r, '5 steps in a row', 'non-finite', 'learning_rate', f"{out_dir / 'ckpt.pt'} (iter 5) is intact")
    skipped = [row for row in map(json.loads, (out_dir / 'log.jsonl').read_text().splitlines()) if row.get('skipped')]
    assert [row['bad_steps'] for row in skipped] == [1, 2, 3, 4, 5]
    assert r.out.count('warning: iter') == 5 and 'no checkpoint' in r.out  # the NaN evaluation saved nothing
    m, ckpt = load_model(out_dir)  # finite (load_model checks) and loadable: the weights of iteration 5
    assert ckpt['iter_num'] == 5 and all(torch.isfinite(p).all() for p in m.parameters())
    good = ckpt_of(half.out_dir / 'ckpt.pt')['model']
    assert all(torch.equal(good[k], v) for k, v in ckpt['model'].items())

# -----------------------------------------------------------------------------
# checkpoints: durable writes, the previous one kept, one line for one that does not load


def tiny_checkpoint(folder, iters=(1, 2), **kw):
    """a tiny dense gpt2 checkpoint saved once per iteration in iters (the last is ckpt.pt, the one before it
    ckpt.prev.pt)"""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65, bias=True, **kw)
    torch.manual_seed(0)
    m = GPT(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    for i in iters:
        save_checkpoint(folder, dict(model=m.state_dict(), model_args=asdict(cfg), iter_num=i, best_val_loss=1.0,
                                     config={'dataset': 'none'}, tokenizer='char'))
    return m, cfg


def test_save_checkpoint_fsyncs_before_the_rename_and_keeps_the_previous(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
        real_fsync(fd)

    def replace(a, b):
        events.append(('replace', str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(checkpoint_py.os, 'fsync', fsync)
    monkeypatch.setattr(checkpoint_py.os, 'replace', replace)
    tiny_checkpoint(tmp_path, iters=(1, 2))
    tmp, final = str(tmp_path / 'ckpt.pt.tmp'), str(tmp_path / 'ckpt.pt')
    for n in (0, 1):  # each save: the data fsynced, then renamed, then the folder fsynced
        save = [e for e in events if e[0] == 'fsync' and e[1] == tmp][n], ('replace', tmp, final)
        first = events.index(save[0])
        rename = events.index(save[1], first)
        assert ('fsync', str(tmp_path)) in events[rename:]
    assert ckpt_of(tmp_path / 'ckpt.pt')['iter_num'] == 2 and ckpt_of(tmp_path / 'ckpt.prev.pt')['iter_num'] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.prev.pt', 'ckpt.pt']


# train.py run with open() patched: the second checkpoint's temporary file takes 4 kB, then the disk is full
FULL_DISK = """import builtins, errno, io, runpy, sys
real_open, opened = builtins.open, []

class FullDisk(io.FileIO):
    room = 4096

    def write(self, data):
        n = len(memoryview(data))
        if n > FullDisk.room:
            raise OSError(errno.ENOSPC, 'No space left on device')
        FullDisk.room -= n
        return super().write(data)

def full_open(file, mode='r', *args, **kwargs):
    if str(file).endswith('ckpt.pt.tmp') and 'w' in mode:
        opened.append(file)
        if len(opened) == 2:
            return FullDisk(file, 'wb')
    return real_open(file, mode, *args, **kwargs)

builtins.open = full_open
sys.argv[0] = {train!r}
sys.path.insert(0, {repo!r})
runpy.run_path({train!r}, run_name='__main__')
"""


def test_a_full_disk_while_saving_is_one_line_and_the_previous_checkpoint_loads(trainer):
    """the disk fills while the checkpoint of iter 10 is written (torch.save's zip writer then raises RuntimeError
    'unexpected pos' on top of the OSError): one line naming the disk and the fix, the checkpoint of iter 5 whole,
    no temporary file left"""
    script = trainer.root / 'full_disk.py'
    script.write_text(FULL_DISK.format(train=str(TRAIN), repo=str(REPO)))
    r = trainer.run(config_args('softmax'), script=script, cache=False)
    out_dir = r.out_dir
    line = one_line_error(r, f'cannot write a checkpoint in {out_dir}', 'No space left on device', 'free space',
                          '--out_dir to a folder on another disk', f"{out_dir / 'ckpt.pt'} (iter 5) is intact")
    assert 'Traceback' not in r.out and 'unexpected pos' not in line
    assert sorted(p.name for p in out_dir.iterdir()) == ['ckpt.pt', 'config.json', 'log.jsonl']
    model, ckpt = load_model(out_dir)  # checked whole: readable, its own architecture, finite
    assert ckpt['iter_num'] == 5
    assert max(r.losses()) == 10  # the run went on to the second checkpoint


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def randomize(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def other_architecture(path):
    """the weights of a 2-layer model under this checkpoint's 1-layer model_args"""
    ckpt = ckpt_of(path)
    ckpt['model'] = GPT(GPTConfig(**{**ckpt['model_args'], 'n_layer': 2})).state_dict()
    torch.save(ckpt, path)


def non_finite(path):
    ckpt = ckpt_of(path)
    ckpt['model']['lm_head.weight'][0, 0] = float('nan')
    torch.save(ckpt, path)


FAULTS = {'truncated': (truncate, 'truncated or corrupted'), 'random bytes': (randomize, 'truncated or corrupted'),
          'another architecture': (other_architecture, 'another architecture'),
          'non-finite weights': (non_finite, 'non-finite weights')}


@pytest.mark.parametrize('fault', FAULTS)
def test_an_unloadable_checkpoint_is_one_line_naming_the_file_and_the_fix(tmp_path, fault):
    spoil, what = FAULTS[fault]
    run_dir = tmp_path / 'run'
    tiny_checkpoint(run_dir)
    spoil(run_dir / 'ckpt.pt')
    with pytest.raises(ValueError) as e:
        load_model(run_dir)
    message = str(e.value)
    assert '\n' not in message and str(run_dir / 'ckpt.pt') in message and what in message, message
    assert f"the previous checkpoint is {run_dir / 'ckpt.prev.pt'}" in message  # the fix
    (run_dir / 'ckpt.prev.pt').unlink()
    with pytest.raises(ValueError, match='train again'):
        load_model(run_dir)


@pytest.mark.parametrize('script, argv', [
    ('eval.py', ['{run}', '--ppl', '{text}']),
    ('upcycle.py', ['--init_from={run}', '--router=softmax', '--out_dir={out}']),
    ('export.py', ['{run}', '--out_dir', '{out}']),
    ('sample.py', ['--out_dir={run}', '--max_new_tokens=2', '--num_samples=1']),
])
def test_every_script_gives_one_line_for_an_unloadable_checkpoint(tmp_path, script, argv):
    if not (REPO / script).exists():
        pytest.skip(f"{script} is not in this tree")
    run_dir, out = tmp_path / 'run', tmp_path / 'out'
    tiny_checkpoint(run_dir)
    truncate(run_dir / 'ckpt.pt')
    (tmp_path / 'text.txt').write_text('hello there\n' * 20)
    args = [a.format(run=run_dir, out=out, text=tmp_path / 'text.txt') for a in argv]
    r = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, cwd=tmp_path,
                       env=child_env(), timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith(f'{script}: error: ') and str(run_dir / 'ckpt.pt') in lines[0], lines[0]
    assert 'truncated or corrupted' in lines[0] and 'ckpt.prev.pt' in lines[0], lines[0]
    assert not out.exists()


def test_resume_falls_back_to_the_previous_checkpoint_saying_so(trainer):
    full = trainer.run(config_args('deepseek')).check()  # checkpoints at 5 (now ckpt.prev.pt) and 10
    assert ckpt_of(full.out_dir / 'ckpt.prev.pt')['iter_num'] == 5
    out_dir = copy_run(trainer, full.out_dir, names=('ckpt.pt', 'ckpt.prev.pt'))
    truncate(out_dir / 'ckpt.pt')
    r = trainer.run([*config_args('deepseek'), '--init_from=resume'], out_dir=out_dir, cache=False).check()
    assert f"warning: {out_dir / 'ckpt.pt'} cannot be read" in r.out
    assert f"falling back to the previous checkpoint {out_dir / 'ckpt.prev.pt'} (iteration 5)" in r.out
    assert sorted(r.losses()) == list(range(6, 11))
    assert_same_losses(r, full, range(6, 11))
    assert ckpt_of(out_dir / 'ckpt.pt')['iter_num'] == 10  # the unloadable one replaced
    assert ckpt_of(out_dir / 'ckpt.prev.pt')['iter_num'] == 5  # the one it resumed from, left as it was

# -----------------------------------------------------------------------------
# bad data and bad config values: one line, non-zero exit, nothing written or damaged


def spoil_data(folder, fault):
    meta = json.loads((folder / 'meta.json').read_text())
    if fault == 'odd bytes':
        with open(folder / 'train.bin', 'ab') as f:
            f.write(b'\x01')
    elif fault == 'malformed meta':
        (folder / 'meta.json').write_text((folder / 'meta.json').read_text()[:40])
    elif fault == 'incomplete meta':
        del meta['vocab_size']
        (folder / 'meta.json').write_text(json.dumps(meta))
    elif fault == 'fewer tokens than meta':
        data = np.fromfile(folder / 'val.bin', dtype=meta['dtype'])
        data[:-2].tofile(folder / 'val.bin')
    elif fault == 'ids beyond the vocabulary':
        data = np.fromfile(folder / 'train.bin', dtype=meta['dtype'])
        data[1000] = meta['vocab_size'] + 5
        data.tofile(folder / 'train.bin')
    elif fault == 'split shorter than block_size':
        data = np.fromfile(folder / 'val.bin', dtype=meta['dtype'])
        data[:20].tofile(folder / 'val.bin')
        (folder / 'meta.json').write_text(json.dumps({**meta, 'val_tokens': 20}))


DATA_FAULTS = {
    'odd bytes': 'not a whole number of uint16 tokens',
    'malformed meta': 'is not readable JSON',
    'incomplete meta': 'lacks vocab_size',
    'fewer tokens than meta': 'but meta.json says',
    'ids beyond the vocabulary': "(the first out of range at position 1000), beyond the model's vocabulary",
    'split shorter than block_size': 'has 20 tokens, fewer than block_size+1=33',
}


@pytest.mark.parametrize('fault', DATA_FAULTS)
def test_bad_data_is_one_line_and_nothing_is_written(trainer, fault):
    name = 'bad_' + fault.replace(' ', '_')
    folder = trainer.root / 'data' / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(trainer.root / 'data' / DATASET, folder)
    spoil_data(folder, fault)
    before = digest(folder)
    r = trainer.run([*TINY, config('softmax'), f'--dataset={name}', '--max_iters=2'], cache=False)
    one_line_error(r, DATA_FAULTS[fault], f'data/{name}')
    assert not r.out_dir.exists() and digest(folder) == before


@pytest.mark.parametrize('argv, message', [
    (['--learning_rate=-0.001'], 'learning_rate=-0.001 must be above 0 (--learning_rate)'),
    (['--top_k=0'], 'top_k=0 must be at least 1'),
    (['--dtype=bf16'], "dtype='bf16' is not one of"),
    (['--dropout=1.5'], 'dropout=1.5 must be in [0, 1)'),
    (['--top_k=9'], 'top_k=9 must be between 1 and n_experts=8'),
    (['--block_size=32.5'], "config key 'block_size' in --block_size must be int"),
    (['syntax.py'], 'config file syntax.py, line 2:'),
    (['name.py'], "config file name.py, line 1: NameError: name 'n_embed' is not defined"),
])
def test_bad_config_values_are_one_line_and_nothing_is_written(trainer, argv, message):
    (trainer.root / 'syntax.py').write_text("n_layer = 2\nn_embd = (32\n")
    (trainer.root / 'name.py').write_text("n_head = n_embed // 8\n")
    r = trainer.run([*TINY, config('softmax'), *argv], cache=False)
    one_line_error(r, message)
    assert not r.out_dir.exists()


@pytest.mark.parametrize('make', ['empty file', 'folder of empty files', 'empty folder', 'one character'])
def test_prepare_rejects_empty_input_and_writes_nothing(tmp_path, make):
    src = tmp_path / 'src'
    if make in ('empty file', 'one character'):  # one character: an empty train split (90% of 1 character)
        src = tmp_path / 'empty.txt'
        src.write_text('' if make == 'empty file' else 'a')
    else:
        src.mkdir()
        if make == 'folder of empty files':
            (src / 'a.txt').write_text('')
            (src / 'b.txt').write_text('')
    root = tmp_path / 'data'
    r = subprocess.run([sys.executable, str(REPO / 'prepare.py'), '--input', str(src), '--out_root', str(root)],
                       capture_output=True, text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()  # (a progress bar may come before)
    assert r.returncode != 0 and lines[-1].startswith('prepare.py: error: ') and r.stderr.count('error') == 1, r.stderr
    assert not root.exists()

# -----------------------------------------------------------------------------
# determinism


def test_same_seed_and_config_give_the_same_losses_on_cpu(trainer):
    """a second run of the same config and seed (one thread, as every test run) equals the first bit for bit"""
    first = trainer.run(config_args('deepseek')).check()  # shared with the tests above
    again = trainer.run(config_args('deepseek'), cache=False).check()
    assert sorted(first.losses()) == list(range(1, 11)) and len(set(first.losses().values())) == 10
    assert again.losses() == first.losses() and again.val_losses() == first.val_losses()
    assert [r['aux_loss'] for r in again.train] == [r['aux_loss'] for r in first.train]


def test_eval_rejects_a_damaged_data_folder_before_loading_anything(trainer, tmp_path):
    folder = tmp_path / 'data'
    shutil.copytree(trainer.root / 'data' / DATASET, folder)
    spoil_data(folder, 'odd bytes')  # train.bin: --ppl reads val.bin, but the folder is checked whole
    tiny_checkpoint(tmp_path / 'run')
    r = subprocess.run([sys.executable, str(REPO / 'eval.py'), str(tmp_path / 'run'), '--ppl', str(folder)],
                       capture_output=True, text=True, cwd=tmp_path, env=child_env(), timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith('eval.py: error: '), r.stdout + r.stderr
    assert f"{folder / 'train.bin'} has" in lines[0] and 'not a whole number of uint16 tokens' in lines[0], lines[0]
    assert not (tmp_path / 'run' / 'eval.json').exists()


def test_resuming_a_checkpoint_without_optimizer_state_is_one_line(trainer):
    """an upcycled (or weights-only) checkpoint: refused before its config could be taken for the run's"""
    out_dir = trainer.new_out_dir('upcycled')
    tiny_checkpoint(out_dir, iters=(0,))
    before = digest(out_dir)
    r = trainer.run([*TINY, '--init_from=resume'], out_dir=out_dir, cache=False)
    one_line_error(r, f"{out_dir / 'ckpt.pt'} holds the weights only", f'--init_from={out_dir}')
    assert digest(out_dir) == before
