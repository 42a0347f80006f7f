"""study.py: the protocol (every configuration at the dense model's active width, the same data, seeds), the
tables against the runs' own eval.json files, an interruption (Ctrl-C, and a run stopped after its first
checkpoint) resumed to the numbers of the uninterrupted study, finished runs skipped, bad input in one line.
The runs use study.py's `tiny` scale (seconds per run) and a tiny Llama with GPT-2's tokenizer as the upcycle source."""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SHARED_DATA
import study
from cli import parse, settings_of
from model import GPT, GPTConfig

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}  # one thread: the runs repeat bit for bit


def run_study(args, **kw):
    return subprocess.run([sys.executable, str(REPO / 'study.py'), *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """a tiny Hugging Face Llama (2 layers, d=16) with GPT-2's tokenizer: the dense model of the upcycle track"""
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp('source')
    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / 'gpt2' / 'hf'))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope='module')
def tiny(source, tmp_path_factory):
    """the tiny study of softmax (2 seeds) and dense (1 seed; upcycle: also as it is), interrupted by Ctrl-C during
    its first training and run again to the end: (its arguments, out root, results folder, the Ctrl-C'd output)"""
    root = tmp_path_factory.mktemp('study')
    args = ['--scale', 'tiny', '--only', 'softmax,dense', f'--source={source}', f'--out={root}/out',
            f'--results={root}/results']
    p = subprocess.Popen([sys.executable, str(REPO / 'study.py'), *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if 'train ...' in line:  # the first training has started: Ctrl-C (SIGINT to the whole process group)
            os.killpg(p.pid, signal.SIGINT)
            break
    interrupted = ''.join(lines) + p.stdout.read()
    p.wait(timeout=60)
    assert p.returncode == 1, interrupted
    done = run_study(args)
    assert done.returncode == 0, done.stdout + done.stderr
    return args, root / 'out' / 'tiny', root / 'results' / 'tiny', interrupted


def test_ctrl_c_is_one_line_and_the_rerun_finishes(tiny):
    args, out, results, interrupted = tiny
    assert 'study.py: interrupted; run the same command again to resume' in interrupted
    assert 'Traceback' not in interrupted
    study_json = json.loads((results / 'study.json').read_text())
    names = [(r['track'], r['config'], r['seed']) for r in study_json['runs']]
    assert names == [('scratch', 'dense', 1), ('scratch', 'softmax', 1), ('scratch', 'softmax', 2),
                     ('continue', 'dense_continued', 1), ('continue', 'softmax_upcycled', 1),
                     ('continue', 'softmax_scratch', 1),
                     ('upcycle', 'dense_as_is', None), ('upcycle', 'dense', 1), ('upcycle', 'softmax', 1),
                     ('upcycle', 'softmax', 2)]
    assert study_json['machine']['torch'] == torch.__version__ and study_json['command'].startswith('python study.py')


def test_every_run_has_the_same_protocol(tiny):
    """the same data, size, budget and seed in every scratch command, save the router's own settings"""
    _, out, results, _ = tiny
    runs = json.loads((results / 'study.json').read_text())['runs']
    scratch = [r for r in runs if r['track'] == 'scratch']
    s = study.SCALES['tiny']
    for r in scratch:
        cmd = r['commands']['train'].split()
        assert cmd[:2] == ['python', 'train.py']
        for k, v in {**s['scratch'], 'dataset': s['scratch_dataset'], 'seed': r['seed'], 'dtype': 'float32'}.items():
            assert f'--{k}={v}' in cmd, (k, r['config'])
        assert r['commands']['eval'].startswith('python eval.py')
        rows = [json.loads(line) for line in Path(r['dir'], 'log.jsonl').read_text().splitlines()]
        assert max(row['iter'] for row in rows) == s['scratch']['max_iters']


def test_tables_are_the_runs_own_numbers_with_mean_and_std(tiny):
    """the markdown cells are mean ± sample std (numpy, ddof=1) over seeds of the numbers in each run's eval.json"""
    _, out, results, _ = tiny
    table = (results / 'scratch.md').read_text()
    row = next(l for l in table.splitlines() if l.startswith('| softmax |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    evals = [json.loads((out / 'scratch' / f'softmax_s{seed}' / 'eval.json').read_text()) for seed in (1, 2)]
    src = f"data/{study.SCALES['tiny']['scratch_dataset']}"
    for col, key in ((2, 'loss'), (3, 'bpb')):
        xs = np.array([e['ppl'][src][key] for e in evals])
        assert cells[col] == f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}"
    wiki = np.array([e['ppl'][str(study.WIKITEXT)]['loss'] for e in evals])
    assert cells[4] == f"{wiki.mean():.3f} ± {wiki.std(ddof=1):.3f}"
    cv = [np.mean([layer['load_cv'] for layer in e['routing'][f'ppl:{src}']]) for e in evals]
    assert cells[9] == f"{np.mean(cv):.2f} ± {np.std(cv, ddof=1):.2f}"
    assert cells[1] == '2'
    up = (results / 'upcycle.md').read_text()
    row = next(l for l in up.splitlines() if l.startswith('| softmax |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    copa = [json.loads((out / 'upcycle' / f'softmax_s{seed}' / 'eval.json').read_text())['tasks']['copa']
            for seed in (1, 2)]
    scores = [t['acc'] for t in copa]
    sd = np.std(np.array(scores) * 100, ddof=1)
    # the standard error of one run beside it: lm-eval's, the mean over the seeds
    se = np.mean([t['acc_stderr'] for t in copa]) * 100
    assert cells[2] == f"{np.mean(scores) * 100:.1f} ± {sd:.1f} ({se:.1f})"
    assert next(l for l in up.splitlines() if l.startswith('| dense_as_is |'))
    for png in ('curves.png', 'load_scratch.png', 'load_upcycle.png', 'continue.png'):
        assert (results / png).stat().st_size > 1000
    # upcycled weights are deleted once evaluated (every number is in study.json); the dense import stays
    assert not list((out / 'upcycle' / 'softmax_s1').rglob('ckpt*.pt'))
    assert (out / 'upcycle' / 'source' / 'ckpt.pt').is_file()


def test_a_run_stopped_after_its_first_checkpoint_resumes_to_the_same_numbers(tiny):
    """a run killed after its iteration-3 checkpoint (its folder as a kill leaves it: ckpt.pt of iter 3, no marker)
    resumes from that checkpoint and ends with the uninterrupted run's numbers; the other runs are skipped"""
    args, out, results, _ = tiny
    run = out / 'scratch' / 'softmax_s2'
    before = json.loads((run / 'study.json').read_text())
    saved = run.parent / 'softmax_s2_finished'
    shutil.copytree(run, saved)
    try:
        os.replace(run / 'ckpt.prev.pt', run / 'ckpt.pt')  # the checkpoint of iteration 3
        for name in ('study.json', 'study_steps.json', 'eval.json'):
            (run / name).unlink()
        again = run_study(args)
        assert again.returncode == 0, again.stdout + again.stderr
        after = json.loads((run / 'study.json').read_text())
        steps = json.loads((run / 'study_steps.json').read_text())
        assert steps['train']['resumed'] and steps['train']['command'].endswith('--init_from=resume')
        for key in ('heldout', 'wikitext'):
            assert after[key]['loss'] == pytest.approx(before[key]['loss'], abs=1e-6)
        assert [i for i, _ in after['curve']] == [1, 2, 3, 4, 5, 6]  # the log kept iterations 1-3, then 4-6
        assert [x for _, x in after['curve']] == pytest.approx([x for _, x in before['curve']], abs=1e-6)
        assert again.stdout.count('finished earlier, skipped') == 9
    finally:
        shutil.rmtree(run)
        os.replace(saved, run)


def test_a_finished_study_is_skipped_whole_but_a_changed_command_runs_again(tiny):
    """run again, a finished study runs nothing; a run whose recorded command differs from the plan's (here the
    dense model's evaluation, as if the protocol had changed since) runs again, to the same numbers"""
    args, out, results, _ = tiny
    before = json.loads((results / 'study.json').read_text())['runs']
    again = run_study(args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count('finished earlier, skipped') == 10 and 'train ...' not in again.stdout
    after = json.loads((results / 'study.json').read_text())['runs']
    assert [r['heldout']['loss'] for r in after if r['track'] == 'scratch'] == \
           [r['heldout']['loss'] for r in before if r['track'] == 'scratch']
    steps_path = out / 'upcycle' / 'source' / 'study_steps.json'
    steps = json.loads(steps_path.read_text())
    steps['eval']['command'] = steps['eval']['command'].replace('--limit ', '--limit 1')
    steps_path.write_text(json.dumps(steps))
    changed = run_study(args)
    assert changed.returncode == 0, changed.stderr
    assert 'upcycle/dense_as_is: its eval command changed since it ran: it runs again' in changed.stdout
    assert changed.stdout.count('finished earlier, skipped') == 9 and changed.stdout.count('eval ...') == 1
    rerun = json.loads((results / 'study.json').read_text())['runs']
    assert [r['average'] for r in rerun if r['track'] == 'upcycle'] == [r['average'] for r in before if r['track'] == 'upcycle']
    assert (out / 'upcycle' / 'source' / 'ckpt.pt').is_file()  # the dense import is kept


def test_a_part_writes_its_tables_next_to_its_runs(tiny):
    """without --results, a study that is not every run of its scale (here 7 of tiny's) reports into its out folder,
    so the complete study's results/<scale> is never replaced by a part of it"""
    args, out, results, _ = tiny
    part = run_study(['--report' if a.startswith('--results=') else a for a in args])
    assert part.returncode == 0, part.stderr
    assert f'wrote {out / "study.json"}' in part.stdout and not (REPO / 'results' / 'tiny').exists()
    assert json.loads((out / 'study.json').read_text())['runs'] == json.loads((results / 'study.json').read_text())['runs']


def train_defaults():
    """train.py's settings, from its own source (its literal module-level assignments), and every router's"""
    import moe
    return {**settings_of(REPO / 'train.py'), **moe.router_settings()}


@pytest.mark.parametrize('scale', ['cpu', 'gpu'])
def test_every_configuration_has_the_dense_active_width_and_parses(scale, tmp_path):
    """each scratch command of the scale, parsed as train.py parses it, builds a model whose active parameters
    equal the dense model's up to the router's own (< 2%; HyperRouter's frozen hypernetwork left out); every eval
    command parses; nothing runs (--dry_run)"""
    import eval as ev
    defaults = train_defaults()
    prep, runs = study.plan(scale, ['scratch', 'continue', 'upcycle'], [], Path('out/study') / scale, 'model.gguf')
    s = study.SCALES[scale]
    n = s['scratch']['max_iters']
    assert [r['config'] for r in runs if r['track'] == 'scratch'] == \
           [n for n in s['scratch_configs'] for _ in (s['seeds'] if n in s['seeded'] else [0])]
    active = {}
    for r in runs:
        if r['track'] == 'upcycle':  # from the imported model (dense, as it is: eval only) or its upcycled copy
            assert r['config'] == 'dense_as_is' or any(a.startswith('--init_from=') for a in r['steps']['train'])
            if 'upcycle' in r['steps']:
                # the fine-tune gives no scale other than the upcycled model's (train.py refuses a contradiction)
                up, tune = (parse(defaults, [str(REPO / a) if a.startswith('configs/') else a for a in argv
                                             if not a.startswith(('--init_from', '--out_dir', '--seed'))])[0]
                            for argv in (r['steps']['upcycle'][1:], r['steps']['train'][1:]))
                for k in ('shared_scale', 'routed_scale'):
                    assert tune[k] in (defaults[k], up[k]), (r['config'], k, tune[k], up[k])
            continue
        argv = r['steps']['train'][1:]
        if r['track'] == 'continue':
            # (a) and (b) from the dense run's checkpoint, on the batches after its N; (c) 2N steps from scratch
            first = f"--init_from={Path('out/study') / scale / 'scratch' / ('dense_s' + str(s['seeds'][0]))}"
            if r['arm'] == 'scratch':
                assert f'--max_iters={2 * n}' in argv and not any(a.startswith('--init_from') for a in argv)
            else:
                assert f'--data_start={n}' in argv and f'--max_iters={n}' in argv
                assert first in (argv if r['arm'] == 'dense' else r['steps']['upcycle'])
            ev.parse_args(r['steps']['eval'][1:])
            continue
        config, _ = parse(defaults, [str(REPO / a) if a.startswith('configs/') else a for a in argv])
        args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
        args['router_options'] = {k: config[k] for k in __import__('moe').router_settings()}
        with torch.device('meta'):
            model = GPT(GPTConfig(**{**args, 'vocab_size': 50257}))
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # hyper's hypernetwork
        active[r['config']] = model.num_params()[1] - frozen
        ev.parse_args(r['steps']['eval'][1:])
    dense = active.pop('dense')
    for name, n in active.items():
        assert 1.0 <= n / dense < 1.02, (name, n, dense)
    dry = run_study(['--scale', scale, '--dry_run', f'--out={tmp_path}/out', f'--results={tmp_path}/res'])
    assert dry.returncode == 0 and dry.stdout.count('python train.py') == sum('train' in r['steps'] for r in runs)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'res').exists()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    for args, says in ((['--only', 'softmax,nonsense'], 'unknown configuration nonsense'),
                       (['--source', str(tmp_path / 'missing.gguf')], 'does not exist'),
                       (['--report'], 'no finished runs in'),
                       (['--compare', 'softmax,dense'], 'give two configurations with finished runs')):
        r = run_study(['--scale', 'tiny', *args, f'--out={tmp_path}/out', f'--results={tmp_path}/res'])
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / 'out').exists() and not (tmp_path / 'res').exists()


def test_the_command_lines_of_the_docs_parse():
    """the forms the docs and the tests use (--key value, --key=value, bare switches); a bad or missing --scale or
    --track is one line"""
    got = study.parse_args(['--scale', 'cpu', '--track', 'scratch', '--only', 'dense,softmax,deepseek', '--dry_run'])
    assert (got['scale'], got['track'], got['only'], got['dry_run'], got['report']) == \
        ('cpu', 'scratch', 'dense,softmax,deepseek', True, False)
    model = str(REPO / 'README.md')  # a file that exists: --source is checked with the command line
    got = study.parse_args(['--scale=gpu', '--report', f'--source={model}', '--out=/tmp/o', '--keep_checkpoints'])
    assert (got['scale'], got['report'], got['source'], got['out'], got['keep_checkpoints']) == \
        ('gpu', True, model, '/tmp/o', True)
    assert study.parse_args(['--scale', 'cpu', '--compare', 'tcmoe,dense'])['compare'] == 'tcmoe,dense'
    for argv, says in ((['--track', 'scratch'], "--scale='': choose one of cpu, gpu, tiny"),
                       (['--scale', 'huge'], "scale='huge' is not one of 'cpu', 'gpu', 'tiny' (--scale)"),
                       (['--scale', 'cpu', '--track', 'both'],
                        "track='both' is not one of 'all', 'scratch', 'upcycle', 'continue' (--track)"),
                       (['--scale', 'cpu', '--source=/x/model.gguf'], "source='/x/model.gguf' does not exist"),
                       (['--scale', 'cpu', '--seeds=3'], "unknown config key 'seeds'")):
        with pytest.raises(SystemExit) as e:
            study.main(argv)
        assert e.value.code.startswith('study.py: error: ') and says in e.value.code, e.value.code
        assert '\n' not in e.value.code


def meaning(command):
    """a command as what it runs: its arguments, each one that names a file or folder from the repository (alone,
    as --key=PATH or as gguf:PATH) as the real path it names, so that '../shared/data' and the folder a link of
    that name points at are one; everything else (settings, run folders yet to be made) as written"""
    args = []
    for arg in shlex.split(command):
        key, eq, value = arg.partition('=') if arg.startswith('--') else ('', '', arg)
        tag, colon, path = value.partition('gguf:') if value.startswith('gguf:') else ('', '', value)
        if path and (REPO / path).exists():
            path = os.path.realpath(REPO / path)
        args.append(key + eq + tag + colon + path)
    return args


def test_the_committed_results_are_this_protocols_and_the_readmes():
    """results/cpu is what `python study.py --scale cpu` plans today, command for command and setting for setting
    (a protocol edited without running the study again fails here), the data files by what they are however their
    paths are spelled on this machine; results/cpu/README.md shows the tables of results/cpu"""
    recorded = json.loads((REPO / 'results' / 'cpu' / 'study.json').read_text())
    source = re.search(r'--init_from=(\S+)', recorded['preparation']['import']['command']).group(1)
    prep, runs = study.plan('cpu', ['scratch', 'continue', 'upcycle'], [], Path('out/study/cpu'), source)
    assert {k: meaning(study.command_text(v)) for k, v in prep.items()} == \
           {k: meaning(v['command']) for k, v in recorded['preparation'].items()}
    assert [(r['track'], r['config'], r['seed']) for r in runs] == \
           [(r['track'], r['config'], r['seed']) for r in recorded['runs']]
    for planned, ran in zip(runs, recorded['runs']):
        commands = {k: meaning(v.removesuffix(' --init_from=resume')) for k, v in ran['commands'].items()}
        assert commands == {k: meaning(study.command_text(v)) for k, v in planned['steps'].items()}, planned['dir']
    shared = [a for r in recorded['runs'] for c in r['commands'].values() for a in meaning(c) if 'wikitext2' in a]
    assert shared and all(os.path.isabs(a) for a in shared)  # the data files were compared as files
    readme = (REPO / 'results' / 'cpu' / 'README.md').read_text()
    for table in ('scratch.md', 'continue.md', 'upcycle.md'):
        rows = [l for l in (REPO / 'results' / 'cpu' / table).read_text().splitlines() if l.startswith('| ')]
        assert len(rows) > 6 and all(row in readme for row in rows), table


def test_paths_next_to_the_repository_keep_their_links(tmp_path, tmp_path_factory, monkeypatch):
    """a clone whose ../shared is a symbolic link to data elsewhere: the commands say ../shared/data, as the
    committed results do, not where the link points"""
    elsewhere = tmp_path_factory.mktemp('elsewhere')
    (elsewhere / 'data' / 'gutenberg').mkdir(parents=True)
    (tmp_path / 'clone').mkdir()
    (tmp_path / 'shared').symlink_to(elsewhere)
    monkeypatch.setattr(study, 'REPO', tmp_path / 'clone')
    assert study.short(tmp_path / 'shared' / 'data' / 'gutenberg') == Path('../shared/data/gutenberg')
    assert study.short(tmp_path / 'clone' / 'out' / 'study') == Path('out/study')
    assert study.short(elsewhere / 'data') == elsewhere / 'data'  # not next to the clone: absolute


# -----------------------------------------------------------------------------
# the continue track and the verdicts


def test_the_continue_track_starts_from_the_dense_run_and_sees_its_tokens_after_it(tiny):
    """dense N steps, then N more: as dense, upcycled (the dense function at its first evaluation) and the MoE
    from scratch for 2N steps"""
    _, out, results, _ = tiny
    n = study.SCALES['tiny']['scratch']['max_iters']

    def rows(path):
        return [json.loads(line) for line in Path(path, 'log.jsonl').read_text().splitlines()]
    first = [r for r in rows(out / 'scratch' / 'dense_s1') if 'val_loss' in r][-1]
    for name in ('dense_continued', 'softmax_upcycled'):
        log = rows(out / 'continue' / name)
        evals = [r for r in log if 'val_loss' in r]
        # its first evaluation is of the dense run's last weights
        assert evals[0]['val_loss'] == pytest.approx(first['val_loss'], rel=1e-6), name
        assert max(r['iter'] for r in log) == n
    assert max(r['iter'] for r in rows(out / 'continue' / 'softmax_scratch')) == 2 * n
    table = (results / 'continue.md').read_text()
    for row in ('| dense (first N steps) |', '| dense_continued |', '| softmax_upcycled |', '| softmax_scratch |'):
        assert row in table


def test_compare_prints_the_difference_of_the_runs_own_losses(tiny):
    """study.py --compare A,B: the held-out loss difference is the two runs' eval.json losses subtracted
    (paired by the one common seed), its interval around it"""
    args, out, _, _ = tiny
    r = run_study([*args, '--compare', 'softmax,dense'])
    assert r.returncode == 0, r.stderr
    src = f"data/{study.SCALES['tiny']['scratch_dataset']}"
    loss = [json.loads((out / 'scratch' / f'{n}_s1' / 'eval.json').read_text())['ppl'][src]['loss']
            for n in ('softmax', 'dense')]
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith('held-out loss'))
    diff, low, high = map(float, re.findall(r'[+-]\d+\.\d+', line)[:3])
    assert diff == pytest.approx(loss[0] - loss[1], abs=1e-4) and low < diff < high
    assert '(1 paired seed)' in line
    bad = run_study([*args, '--compare', 'softmax,nothing'])
    assert bad.returncode == 1 and 'nothing' not in bad.stderr.split('from')[1].split('(')[0]
    assert len(bad.stderr.strip().splitlines()) == 1


def exact_bootstrap(groups):
    """every equally likely draw of the seeds (S^S) and, per group, of the windows (W^W): the exact bootstrap
    distribution of the mean over groups of the mean over drawn seeds of sum d / sum t, by plain loops"""
    import itertools
    S = len(groups[0][0])
    values = []
    for seeds in itertools.product(range(S), repeat=S):
        per_group = []
        for d, t in groups:
            W = len(t)
            per_group.append([sum(sum(d[s][w] for w in ws) / sum(t[w] for w in ws) for s in seeds) / S
                              for ws in itertools.product(range(W), repeat=W)])
        for combo in itertools.product(*per_group):
            values.append(sum(combo) / len(combo))
    return np.array(values)


def test_the_bootstrap_is_the_exact_one_on_a_hand_made_case():
    """2 seeds, two groups of 3 windows with unequal weights: the replicates' mean, standard deviation and 95%
    interval against the exact bootstrap distribution (all 2^2 x 3^3 x 3^3 draws); the seeds are the same
    draw for both groups (drawn apart, the seed effect would average out and the spread be smaller)"""
    d1 = np.array([[0.9, -0.3, 0.6], [-1.2, 0.3, -0.6]])  # (seeds, windows) summed differences
    d2 = np.array([[0.5, 0.7, 0.4], [-0.8, -0.5, -0.9]])
    t1, t2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 1.0])
    groups = [(d1, t1), (d2, t2)]
    exact = exact_bootstrap(groups)
    point, reps = study.replicates(groups, 200_000, np.random.default_rng(1))
    plain = np.mean([np.mean(d.sum(1) / t.sum()) for d, t in groups])
    assert point == pytest.approx(plain, abs=1e-12)
    assert reps.mean() == pytest.approx(exact.mean(), abs=3e-3)
    assert reps.std() == pytest.approx(exact.std(), rel=1e-2)
    # the whole distribution: its CDF at the exact one's 2.5, 25, 50, 75 and 97.5% points
    for x in np.percentile(exact, [2.5, 25, 50, 75, 97.5]):
        assert np.mean(reps <= x + 1e-12) == pytest.approx(np.mean(exact <= x + 1e-12), abs=5e-3)


def fake_runs(config, diffs, seeds=(1,), track='scratch'):
    """runs whose held-out windows' nats are base + diffs (per seed), 4 windows of 2 tokens"""
    base = np.array([4.0, 5.0, 6.0, 7.0])
    runs = []
    for s in seeds:
        nll = base + np.asarray(diffs, dtype=float)
        held = dict(loss=nll.sum() / 8, bpb=0.0, window_nll=nll.tolist(), window_targets=[2] * 4, tokens=100,
                    bytes=400)
        runs.append(dict(track=track, config=config, seed=s, heldout=held, wikitext=held))
    return runs


@pytest.mark.parametrize('shift, word', [(-0.5, 'better'), (0.0, 'within noise'), (0.5, 'worse')])
def test_the_verdict_flips_when_the_interval_crosses_zero(shift, word):
    """A - B = shift + window noise of +-0.1 per token: the word follows the interval's side of zero"""
    noise = np.array([0.2, -0.2, 0.2, -0.2])
    c = study.compare_runs(fake_runs('a', noise + 2 * shift), fake_runs('b', [0, 0, 0, 0]), ('heldout', 'loss'), 0.0)
    assert c['diff'] == pytest.approx(shift)
    assert c['verdict'] == word and (c['low'] <= 0 <= c['high']) == (word == 'within noise')
    assert study.verdict(-0.2, -0.01, True) == 'better' and study.verdict(-0.2, 0.01, True) == 'within noise'
    assert study.verdict(0.01, 0.2, False) == 'better' and study.verdict(0.01, 0.2, True) == 'worse'


def test_one_seed_adds_the_seeds_noise_and_bpb_scales_the_loss():
    """with one common seed and no window noise, the interval is the seeds' normal one (+-1.96 sd); bits per byte
    are nats per token x tokens / bytes / ln 2"""
    c = study.compare_runs(fake_runs('a', [0.2] * 4), fake_runs('b', [0] * 4), ('heldout', 'loss'), 0.05)
    assert c['diff'] == pytest.approx(0.1)
    assert (c['low'], c['high']) == pytest.approx((0.1 - 1.96 * 0.05, 0.1 + 1.96 * 0.05), abs=5e-3)
    assert c['verdict'] == 'worse'
    wide = study.compare_runs(fake_runs('a', [0.2] * 4), fake_runs('b', [0] * 4), ('heldout', 'loss'), 0.1)
    assert wide['verdict'] == 'within noise'
    bpb = study.compare_runs(fake_runs('a', [0.2] * 4), fake_runs('b', [0] * 4), ('heldout', 'bpb'), 0.0)
    assert bpb['diff'] == pytest.approx(0.1 * 100 / 400 / math.log(2))
    # two seeds: no noise is added, the seeds are drawn
    two = study.compare_runs(fake_runs('a', [0.2] * 4, seeds=(1, 2)), fake_runs('b', [0] * 4, seeds=(1, 2)),
                             ('heldout', 'loss'), 5.0)
    assert two['seeds'] == 2 and two['high'] - two['low'] < 1e-9


def test_seed_noise_is_the_pooled_seed_std_times_root_two():
    runs = (fake_runs('a', [0] * 4, seeds=(1,)) + fake_runs('a', [0.8] * 4, seeds=(2,))
            + fake_runs('b', [0] * 4, seeds=(1,)) + fake_runs('b', [0.4] * 4, seeds=(2,)))
    # a: losses 2.75, 3.15 (sd 0.2828); b: 2.75, 2.95 (sd 0.1414); pooled variance 0.05
    assert study.seed_noise(runs, 'scratch', ('heldout', 'loss')) == pytest.approx(math.sqrt(2 * 0.05))


def test_compare_reads_the_committed_results_where_no_run_finished_here(tmp_path):
    """a fresh clone: --compare takes results/cpu/study.json; softmax - dense on the held-out loss over the 3 paired
    seeds is the difference of their mean losses there"""
    r = run_study(['--scale', 'cpu', '--compare', 'softmax,dense', f'--out={tmp_path}/out'])
    assert r.returncode == 0, r.stderr
    assert 'results/cpu/study.json' in r.stdout and not (tmp_path / 'out').exists()
    runs = json.loads((REPO / 'results' / 'cpu' / 'study.json').read_text())['runs']
    loss = {n: np.mean([x['heldout']['loss'] for x in runs if x['track'] == 'scratch' and x['config'] == n])
            for n in ('softmax', 'dense')}
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith('held-out loss'))
    assert float(re.findall(r'[+-]\d+\.\d+', line)[0]) == pytest.approx(loss['softmax'] - loss['dense'], abs=1e-4)
    assert '(3 paired seeds)' in line


def test_a_task_difference_and_its_seed_noise_are_in_points():
    """documents paired within a seed: A right on 3 of 4 documents, B on 1: +50 points; the seeds' noise (B's
    scores 25 and 75 over two seeds: std 35.4 points, times sqrt 2) widens a one-seed interval in points"""
    def runs(config, docs):
        return [dict(track='upcycle', config=config, seed=s, average=np.mean(d),
                     tasks={'copa': dict(acc=np.mean(d), per_doc=dict(doc_id=[0, 1, 2, 3], acc=d))})
                for s, d in docs.items()]
    a = runs('a', {1: [1.0, 1.0, 1.0, 0.0]})
    b = runs('b', {1: [1.0, 0.0, 0.0, 0.0], 2: [1.0, 1.0, 1.0, 0.0]})
    noise = study.seed_noise(a + b, 'upcycle', ('copa', 'score'))
    assert noise == pytest.approx(math.sqrt(2) * np.std([25, 75], ddof=1))
    c = study.compare_runs(a, b, ('copa', 'score'), noise)
    assert c['diff'] == pytest.approx(50.0) and c['seeds'] == 1
    assert c['high'] - c['low'] > 2 * 1.9 * noise * 0.9
