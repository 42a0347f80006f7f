"""train.py (the training stage) against references: the config rules of cli.parse, one process for
the multi-process run, the big batch for gradient accumulation, the uninterrupted run for resumed ones.
Tiny models on tiny character data (conftest.py), float32, every step logged."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCHEDULE, TINY, TRAIN, config

sys.path.insert(0, str(REPO))
from cli import configure, settings_of  # noqa: E402

DEFAULTS = dict(out_dir='out', batch_size=16, n_layer=4, n_embd=128, n_head=4, n_kv_head=0, mlp_hidden=0,
                arch='gpt2', router='dense', top_k=2, n_shared_experts=0, aux_loss_coef=0.01,
                learning_rate=1e-3, compile=False, balance_scope='batch', bias_update_rate=1e-3)


def write(path, text):
    path.write_text(text)
    return str(path)


def error_message(argv, defaults=DEFAULTS):
    """configure's one-line ValueError (train.py prints it as 'train.py: error: <message>')"""
    with pytest.raises(ValueError) as e:
        configure(defaults, argv)
    message = str(e.value)
    assert message and '\n' not in message, message
    return message

# -----------------------------------------------------------------------------
# configuration


def test_config_files_compose_left_to_right_then_overrides(tmp_path):
    a = write(tmp_path / 'a.py', "n_embd = 64\nbatch_size = 3\nrouter = 'softmax'\n")
    b = write(tmp_path / 'b.py', "import math\n_scratch = 5\nn_embd = 2 * n_embd  # sees a.py's value\n"
                                 "mlp_hidden = n_embd + batch_size\n")
    c = configure(DEFAULTS, [a, b, '--batch_size=7', '--router=sigmoid'])
    expected = dict(DEFAULTS, n_embd=128, batch_size=7, router='sigmoid', mlp_hidden=131)
    assert c == expected
    assert configure(DEFAULTS, [b, a]) == dict(DEFAULTS, n_embd=64, batch_size=3, router='softmax', mlp_hidden=272)
    assert configure(DEFAULTS, ['--n_embd=48', a]) == dict(DEFAULTS, n_embd=64, batch_size=3, router='softmax')
    assert configure(DEFAULTS, []) == DEFAULTS and DEFAULTS['batch_size'] == 16  # defaults untouched


def test_llama_preset_computes_from_earlier_values():
    c = configure(DEFAULTS, ['--n_embd=48', '--n_head=6', config('llama'), config('deepseek')])
    assert (c['arch'], c['n_kv_head'], c['mlp_hidden']) == ('llama', 3, 8 * ((8 * 48 // 3 + 7) // 8))
    assert (c['router'], c['n_shared_experts'], c['balance_scope'], c['aux_loss_coef']) == \
           ('deepseek', 1, 'sequence', 1e-4)


def test_override_types():
    c = configure(DEFAULTS, ['--learning_rate=1', '--compile=True', '--out_dir=out/x', "--arch='llama'"])
    assert c['learning_rate'] == 1.0 and type(c['learning_rate']) is float  # an int where a float is expected
    assert c['compile'] is True and c['out_dir'] == 'out/x' and c['arch'] == 'llama'
    for arg in ('--batch_size=abc', '--batch_size=4.0', '--batch_size=True', '--compile=1', '--learning_rate=fast'):
        key = arg[2:].split('=')[0]
        message = error_message([arg])
        assert f"'{key}'" in message and 'must be' in message, (arg, message)
    # a text setting takes the command line's text as it is (--wandb_run_name=2024); a config file's number is wrong
    assert configure(DEFAULTS, ['--out_dir=3'])['out_dir'] == '3'


def test_a_config_files_value_of_the_wrong_type(tmp_path):
    message = error_message([write(tmp_path / 'number.py', "out_dir = 3\n")])
    assert "'out_dir'" in message and 'must be str, got 3' in message


def test_unknown_keys_and_bad_arguments_are_one_line(tmp_path):
    assert "unknown config key 'bach_size'" in error_message(['--bach_size=4'])
    f = write(tmp_path / 'typo.py', "batch_size = 4\nlerning_rate = 1e-3\n")
    message = error_message([f])
    assert "unknown config key 'lerning_rate'" in message and 'typo.py' in message
    f = write(tmp_path / 'wrong.py', "batch_size = 'big'\n")
    message = error_message([f])
    assert "'batch_size'" in message and 'wrong.py' in message and 'must be int' in message
    assert 'needs a value' in error_message(['--batch_size'])
    assert 'cannot read config file' in error_message([str(tmp_path / 'missing.py')])


@pytest.mark.parametrize('argv, message', [
    (['--bach_size=4'], "train.py: error: unknown config key 'bach_size' in --bach_size"),
    (['typo.py'], "train.py: error: unknown config key 'lerning_rate' in typo.py"),
    (['wrong.py'], "train.py: error: config key 'batch_size' in wrong.py must be int, got 'big'"),
])
def test_train_rejects_bad_config_with_one_line(trainer, argv, message):
    (trainer.root / 'typo.py').write_text("batch_size = 4\nlerning_rate = 1e-3\n")
    (trainer.root / 'wrong.py').write_text("batch_size = 'big'\n")
    r = trainer.run([config('softmax'), *argv], cache=False)
    assert r.rc != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.out
    assert 'tokens per iteration' not in r.out and not r.out_dir.exists()  # nothing started


def test_gpu_preset_composes_and_asks_for_its_data(trainer):
    r = trainer.run([config('sigmoid'), config('gpu')], cache=False)
    assert r.rc != 0
    assert r.stderr.strip().splitlines()[-1].startswith('train.py: error: no prepared data at data/gutenberg_gpt2'), r.out

# -----------------------------------------------------------------------------
# every config trains


# composed after a router file (global_balance trains in tests/test_ep.py, force_balance is a benchmark option)
PRESETS = {'gpu', 'llama', 'force_balance', 'global_balance'}
CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if p.stem not in PRESETS) + ['llama+sigmoid']


def config_args(name):
    return [*TINY, *map(config, name.split('+')), *SCHEDULE]


def test_every_config_is_covered():
    assert {p.stem for p in (REPO / 'configs').glob('*.py')} - PRESETS <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_trains_and_loss_falls(trainer, name):
    r = trainer.run(config_args(name)).check()
    losses = r.losses()
    assert sorted(losses) == list(range(1, 11)), r.out
    assert all(math.isfinite(v) for v in losses.values())
    first, last = losses[1], sum(losses[i] for i in (8, 9, 10)) / 3
    assert last < first - 0.3, f"loss did not fall: {losses}"
    val = r.val_losses()
    assert sorted(val) == [0, 5, 10] and val[10] < val[0] - 0.3, val
    # a config file runs among train.py's settings (cli.parse), which it may read
    scope = settings_of(TRAIN)
    exec(Path(config(name.split('+')[-1])).read_text(), scope)
    assert json.loads((r.out_dir / 'config.json').read_text())['router'] == scope['router']
    if name.startswith('llama'):
        ckpt = torch.load(r.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
        assert ckpt['model_args']['arch'] == 'llama' and ckpt['model_args']['n_kv_head'] == 2
        assert ckpt['model_args']['mlp_hidden'] == 8 * ((8 * 32 // 3 + 7) // 8)

# -----------------------------------------------------------------------------
# processes, accumulation and logging


def assert_same_losses(run, ref, rel, iters=None, evals=True):
    got, want = run.losses(), ref.losses()
    iters = sorted(want) if iters is None else iters
    assert set(iters) <= set(got), f"missing steps: {sorted(got)}\n{run.out[-3000:]}"
    bad = {i: (got[i], want[i]) for i in iters if got[i] != pytest.approx(want[i], rel=rel)}
    assert not bad, f"loss differs from the reference at steps {bad}"
    if evals:
        got, want = run.val_losses(), ref.val_losses()
        bad = {i: (got[i], want[i]) for i in got if got[i] != pytest.approx(want[i], rel=rel)}
        assert set(got) <= set(want) and not bad, f"val loss differs from the reference: {bad} ({got} vs {want})"


def test_two_processes_match_one(trainer):
    ref = trainer.run(config_args('softmax')).check()
    ddp = trainer.run(config_args('softmax'), nproc=2).check()
    assert '2 processes' in ddp.out
    assert_same_losses(ddp, ref, rel=1e-5)
    for a, b in zip(ddp.train, ref.train):  # the aux losses are global means too
        assert a['aux_loss'] == pytest.approx(b['aux_loss'], rel=1e-5) and a['z_loss'] == pytest.approx(b['z_loss'], rel=1e-5)


def test_logged_loss_is_the_mean_over_the_global_batch(trainer):
    """2 micro-batches of 4 see the 8 sequences of 1 batch of 8: the logged loss (a mean over the micro-steps)
    and the update (dense model, no per-micro-batch aux loss) must equal the big batch's"""
    accumulated = trainer.run(config_args('dense')).check()
    big = trainer.run([*config_args('dense'), '--gradient_accumulation_steps=1', '--batch_size=8']).check()
    assert accumulated.losses()[1] == pytest.approx(big.losses()[1], rel=1e-6)
    assert_same_losses(accumulated, big, rel=1e-5, evals=False)  # eval batches have batch_size sequences


def test_log_and_config_json(trainer):
    r = trainer.run(config_args('softmax')).check()
    for row in r.train:
        assert {'iter', 'loss', 'aux_loss', 'z_loss', 'lr', 'load_cv', 'dropped'} <= set(row)
        assert isinstance(row['iter'], int) and isinstance(row['loss'], float)
    assert [row['iter'] for row in r.train] == list(range(1, 11))
    assert [row['iter'] for row in r.evals] == [0, 5, 10]
    used = json.loads((r.out_dir / 'config.json').read_text())
    expected = dict(router='softmax', n_layer=2, n_embd=32, batch_size=4, learning_rate=0.01, max_iters=10,
                    lr_decay_iters=10, dtype='float32', out_dir=str(r.out_dir), top_k=2, n_experts=8,
                    router_jitter=0.01, always_save_checkpoint=True)
    assert {k: used.get(k) for k in expected} == expected
    assert type(used['learning_rate']) is float
    ckpt = torch.load(r.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['config'] == used and ckpt['iter_num'] == 10

# -----------------------------------------------------------------------------
# checkpoints


def half_args(name):
    return [*config_args(name), '--max_iters=5']  # same schedule (lr_decay_iters=10), stops at the checkpoint at 5


@pytest.mark.parametrize('name', ['deepseek', 'switch'])  # expert bias buffer; random router jitter (rng state)
def test_resume_continues_exactly(trainer, name):
    full = trainer.run(config_args(name)).check()
    half = trainer.run(half_args(name)).check()
    assert_same_losses(half, full, rel=1e-6, iters=range(1, 6))
    ckpt = torch.load(half.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['iter_num'] == 5
    resumed = trainer.resume(half.out_dir, config_args(name)).check()
    assert sorted(resumed.losses()) == list(range(6, 11)), resumed.out
    assert_same_losses(resumed, full, rel=1e-6, iters=range(6, 11))


def test_data_start_continues_the_data_order(trainer):
    """a run from another's checkpoint folder with --data_start=5 trains on the batches the uninterrupted run
    takes from step 5 on: its first loss (the weights after 5 steps, on batch 5) is the full run's sixth"""
    full = trainer.run(config_args('dense')).check()
    half = trainer.run(half_args('dense')).check()
    after = [*config_args('dense'), f'--init_from={half.out_dir}', '--max_iters=2']
    continued = trainer.run([*after, '--data_start=5'], cache=False).check()
    assert continued.losses()[1] == pytest.approx(full.losses()[6], rel=1e-6)
    # without it the continuation sees the first batch again
    again = trainer.run(after, cache=False).check()
    assert again.losses()[1] != pytest.approx(full.losses()[6], rel=1e-3)


KILLER = '''
import io, os, runpy, signal, sys
import torch
sys.path.insert(0, {repo!r})
real_save, saves = torch.save, []

def save(obj, f, *args, **kwargs):
    saves.append(f)
    if len(saves) < {kill_at}:
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf)
    out = open(f, 'wb') if isinstance(f, (str, os.PathLike)) else f
    out.write(buf.getvalue()[:len(buf.getvalue()) // 2])  # half of the file, then the process dies
    out.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name='__main__')
'''


def test_kill_during_checkpoint_keeps_the_last_good_one(trainer):
    driver = trainer.root / 'kill_at_second_save.py'
    driver.write_text(KILLER.format(kill_at=2, train=str(TRAIN), repo=str(REPO)))
    killed = trainer.run(config_args('deepseek'), script=driver, cache=False)  # checkpoints at 5, then dies at 10
    assert killed.rc == -9, killed.out
    assert sorted(killed.losses()) == list(range(1, 11))
    partial = killed.out_dir / 'ckpt.pt.tmp'
    assert partial.exists()
    with pytest.raises(Exception):
        torch.load(partial, map_location='cpu', weights_only=True)
    ckpt = torch.load(killed.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['iter_num'] == 5
    # and training goes on from it as if nothing happened
    full = trainer.run(config_args('deepseek')).check()
    resumed = trainer.resume(killed.out_dir, config_args('deepseek')).check()
    assert resumed.val_losses()[5] == pytest.approx(full.val_losses()[5], rel=1e-6)
    assert_same_losses(resumed, full, rel=1e-6, iters=range(6, 11))


def test_train_fine_tunes_an_upcycled_checkpoint(trainer, tmp_path):
    """a tiny Hugging Face Llama -> upcycle.py (softmax, 4 experts) -> train.py init_from=<that folder>: the
    architecture comes from the checkpoint and the fine-tuned val loss falls"""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / 'hf')
    up = tmp_path / 'up'
    r = subprocess.run([sys.executable, str(REPO / 'upcycle.py'), config('softmax'), f'--init_from={tmp_path / "hf"}',
                        '--n_experts=4', f'--out_dir={up}'], capture_output=True, text=True, cwd=trainer.root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'computes the dense model' in r.stdout
    run = trainer.run([*TINY, config('softmax'), f'--init_from={up}', '--max_iters=10', '--eval_interval=10'],
                      cache=False).check()
    ckpt = torch.load(run.out_dir / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['router'] == 'softmax' and ckpt['model_args']['n_experts'] == 4
    assert ckpt['model_args']['arch'] == 'llama' and ckpt['iter_num'] == 10
    first, last = run.evals[0]['val_loss'], run.evals[-1]['val_loss']
    assert last < first - 0.3, (first, last)
