"""Sharded data parallelism (FSDP2, fsdp.py) and activation checkpointing against the references: training
at 2 processes (FSDP), 4 (FSDP with ep_size=2) and with activation checkpointing gives the one-process losses;
the global balance scope the DDP run's at the same world size; checkpoints move between every layout (one
process, DDP, FSDP, FSDP with expert parallelism, sharded); each rank's shards hold about 1/world of the
whole; and a recomputed forward counts nothing twice (the layer's counters against the run without
recomputation)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SCHEDULE, TINY, child_env, config, launcher, run_command
from test_ep import assert_same_losses, close

sys.path.insert(0, str(REPO))
import moe  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

FOUR = ['--gradient_accumulation_steps=4']  # a micro-batch per rank at 4 processes


def args(name, *extra):
    return [*TINY, config(name), *SCHEDULE, *extra]


def assert_same_stats(run, ref):
    for a, b in zip(run.train, ref.train):
        assert a['aux_loss'] == pytest.approx(b['aux_loss'], rel=1e-5), (a, b)
        assert a['experts_per_token'] == pytest.approx(b['experts_per_token'], rel=1e-5), (a, b)
        assert a['layer_load'] == b['layer_load'], (a['iter'], a['layer_load'], b['layer_load'])


def load(run):
    return torch.load(run.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)

# -----------------------------------------------------------------------------
# every router, one forward and backward


def test_every_router_sharded_gives_the_whole_models_loss_and_gradients(tmp_path):
    """tests/fsdp_worker.py at 2 processes: every router, capacity, a gated shared expert, expert
    parallelism under FSDP (with recomputation), bf16's mixed precision, against the whole model in
    one process"""
    cmd = [*launcher(2), str(REPO / 'tests' / 'fsdp_worker.py'), str(tmp_path)]
    rc, out, err = run_command(cmd, tmp_path, child_env(), timeout=240)
    assert rc == 0, out + err
    for r in range(2):
        results = json.loads((tmp_path / f'rank{r}.json').read_text())
        assert set(moe.ROUTERS) < set(results) and len(results) == len(moe.ROUTERS) + 5
        bad = {case: problems for case, problems in results.items() if problems}
        assert not bad, bad

# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize('name, nproc, extra', [
    ('remoe', 2, ['--activation_checkpointing=block']),
    ('deepseek', 4, ['--ep_size=2', '--activation_checkpointing=block']),
])
def test_fsdp_training_equals_one_process(trainer, name, nproc, extra):
    four = FOUR if nproc == 4 else []
    ref = trainer.run(args(name, *four)).check()
    run = trainer.run(args(name, *four, '--parallel=fsdp', *extra), nproc=nproc).check()
    assert f'{nproc} processes, ep_size {2 if nproc == 4 else 1}, fsdp' in run.out
    assert_same_losses(run, ref, rel=1e-5, iters=range(1, 11))
    assert_same_stats(run, ref)
    a, b = load(ref), load(run)
    assert a['model'].keys() == b['model'].keys() and b['model_args']['ep_size'] == 1
    for k, t in a['model'].items():
        # the whole model gathered (an expert tensor holds all 8 experts), equal up to float32 noise
        assert t.shape == b['model'][k].shape and close(b['model'][k], t, 2e-4), k
    for n, s in a['optimizer'].items():
        # Adam's moments: a wrong expert gradient scale or a gradient reduced twice (factors of 2
        # and more) shows here; float32 noise over 10 steps stays within 1e-3
        for k, t in s.items():
            assert close(b['optimizer'][n][k], t, 1e-3), (n, k)


def test_global_balance_under_fsdp_and_recomputation_equals_ddp(trainer):
    """the global scope sums every rank's counts so far in the step: the same world size is the
    reference (the DDP run, itself checked against one process in test_ep.py)"""
    base = args('softmax', config('global_balance'), '--max_iters=5')
    ddp = trainer.run(base, nproc=2).check()
    run = trainer.run([*base, '--parallel=fsdp', '--activation_checkpointing=block'], nproc=2).check()
    assert_same_losses(run, ddp, rel=1e-5, iters=range(1, 6))
    assert_same_stats(run, ddp)

# -----------------------------------------------------------------------------
# checkpoints across layouts: each layout saves at iteration 5, another continues to 10


# (processes, settings); a run with 4 processes has 4 micro-batches a step (FOUR), the layouts
# it moves from or to too
LAYOUTS = {
    'one': (1, []),
    'ddp': (2, []),
    'fsdp': (2, ['--parallel=fsdp', '--save_sharded=True']),
    'fsdp_ep2': (4, ['--parallel=fsdp', '--ep_size=2', '--save_sharded=True']),
}


def half(trainer, layout, four=()):
    """deepseek trained 5 steps in a layout"""
    n, extra = LAYOUTS[layout]
    return trainer.run(args('deepseek', *four, *extra, '--max_iters=5'), nproc=n).check()


@pytest.mark.parametrize('before, after', [('one', 'fsdp_ep2'), ('fsdp_ep2', 'fsdp'), ('fsdp', 'ddp')])
def test_a_checkpoint_continues_in_another_layout(trainer, tmp_path, before, after):
    """a checkpoint continues in another layout: the same losses as the uninterrupted one-process
    run (global batches are layout-free, tests/test_ep.py). A cycle through the layouts: one
    process's ckpt.pt in FSDP with ep_size 2 at 4 ranks (saving sharded, then converted), those
    shards in FSDP at 2 ranks, FSDP's shards in DDP, and DDP's ckpt.pt in one process
    (tests/test_ep.py); FSDP's gathered ckpt.pt: test_fsdp_training_equals_one_process"""
    n_after, extra_after = LAYOUTS[after]
    four = FOUR if 4 in (LAYOUTS[before][0], n_after) else []
    full = trainer.run(args('deepseek', *four)).check()
    saved = half(trainer, before, four)
    sharded = '--save_sharded=True' in LAYOUTS[before][1]
    assert (saved.out_dir / 'ckpt_shards' / 'meta.pt').exists() == sharded
    assert (saved.out_dir / 'ckpt.pt').exists() != sharded
    out = tmp_path / 'continued'
    subprocess.run(['cp', '-r', str(saved.out_dir), str(out)], check=True)
    resumed = trainer.run([*args('deepseek', *four, *extra_after), '--init_from=resume'],
                          nproc=n_after, out_dir=out, cache=False).check()
    assert sorted(resumed.losses()) == list(range(1, 11))  # the log kept the first 5
    assert_same_losses(resumed, full, rel=1e-5, iters=range(6, 11))
    if '--save_sharded=True' in extra_after:
        # the one-command conversion: the whole model, as the one-process run's at iteration 10
        r = subprocess.run([sys.executable, str(REPO / 'checkpoint.py'), str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        a, b = load(full), torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)
        assert b['iter_num'] == 10 and a['model'].keys() == b['model'].keys()
        for k, t in a['model'].items():
            assert close(b['model'][k], t, 2e-4), k


def test_each_ranks_shards_hold_a_world_share(trainer):
    """the sizes of the local shards (a sharded checkpoint's rank files), not timings: each rank
    holds about 1/world of the parameters and of AdamW's state, with and without ep_size"""
    for layout, four in (('fsdp', []), ('fsdp_ep2', FOUR)):
        run, nproc = half(trainer, layout, four), LAYOUTS[layout][0]
        whole = {'model': 0, 'optimizer': 0}
        ranks = []
        for r in range(nproc):
            f = torch.load(run.out_dir / 'ckpt_shards' / f'rank{r}.pt', weights_only=True)
            size = {'model': sum(e['t'].nbytes for e in f['model'].values()),
                    'optimizer': sum(e['t'].nbytes for s in f['optimizer'].values()
                                     for e in s.values())}
            ranks.append(size)
            for k in whole:
                whole[k] += size[k]
        for size in ranks:
            for k in whole:
                # torch.chunk's rounding and rank 0's replicated buffers and steps
                assert size[k] == pytest.approx(whole[k] / nproc, rel=0.1), (nproc, k, ranks)


def test_a_broken_sharded_checkpoint_is_one_line(trainer, tmp_path):
    out = tmp_path / 'broken'
    subprocess.run(['cp', '-r', str(half(trainer, 'fsdp').out_dir), str(out)], check=True)
    (out / 'ckpt_shards' / 'rank1.pt').unlink()
    r = subprocess.run([sys.executable, str(REPO / 'checkpoint.py'), str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'ckpt_shards cannot be read' in r.stderr and not (out / 'ckpt.pt').exists()


def test_save_sharded_needs_fsdp(trainer):
    r = trainer.run(args('softmax', '--save_sharded=True'), cache=False)
    assert r.rc != 0 and 'save_sharded=True' in r.out and 'Traceback' not in r.out

# -----------------------------------------------------------------------------
# activation checkpointing: the recomputation counts nothing


@pytest.mark.parametrize('router, extra', [
    ('deepseek', {}), ('remoe', {}), ('quantile', {}), ('topp', {}),
    ('softmax', dict(balance_scope='global')), ('moepp', {}),
])
def test_recomputation_counts_nothing_twice(one_thread, router, extra):
    """forward + backward of a model with and without activation checkpointing: the same loss,
    gradients, statistics, the step's counts (deepseek's bias, remoe's sparsity, quantile's
    estimates), the global scope's counts, and the routing trace"""
    results = []
    for recompute in ('none', 'block'):
        torch.manual_seed(0)
        c = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False,
                      router=router, n_experts=4, top_k=2, activation_checkpointing=recompute,
                      **extra)
        model = GPT(c)
        x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
        trace = [[] for _ in model.moe_layers()]
        with moe.routing(model, trace=trace):
            for _ in range(2):  # two micro-batches: the global counts accumulate
                _, loss = model(x, x)
                loss.backward()
        layers = model.moe_layers()
        counters = [{k: getattr(m, k).clone() for k in
                     ('load', 'sums', 'step_counts', 'step_tokens', 'step_forwards', 'step_sums')}
                    | {'global': m.balance_counts} for m in layers]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads, counters, trace))
    (loss0, g0, c0, t0), (loss1, g1, c1, t1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-5, atol=1e-7), n
    for a, b in zip(c0, c1):
        for k in a:
            assert (a[k] is None) == (b[k] is None), k
            assert a[k] is None or torch.equal(a[k], b[k]), (k, a[k], b[k])
    assert c0[0]['step_forwards'] == 2 and (extra == {} or c0[0]['global'] is not None)
    assert [len(t) for t in t1] == [len(t) for t in t0] == [2] * len(t0)


def test_replay_under_recomputation_takes_each_recorded_routing_once(one_thread):
    """a replayed forward recomputed in the backward takes the ids it replayed, not the next
    record: two micro-batches replay two records exactly"""
    torch.manual_seed(0)
    c = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False,
                  router='softmax', n_experts=4, top_k=2, activation_checkpointing='block')
    model = GPT(c)
    xs = [torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    trace = [[] for _ in model.moe_layers()]
    with moe.routing(model, trace=trace), torch.no_grad():
        for x in xs:
            model(x)
    with moe.routing(model, replay=trace), moe.analysis(model, record=True) as records:
        for x in xs:
            _, loss = model(x, x)
            loss.backward()
    for layer, got in zip(trace, records):
        assert [torch.equal(r['ids'], ids) for r, (ids, _) in zip(layer, got)] == [True, True]


def test_scripts_read_a_sharded_run_folder(trainer, tmp_path):
    """sample.py on a folder holding only ckpt_shards/ writes what it writes from the ckpt.pt that
    checkpoint.py makes of them"""
    out = tmp_path / 'sharded'
    subprocess.run(['cp', '-r', str(half(trainer, 'fsdp').out_dir), str(out)], check=True)
    cmd = [sys.executable, str(REPO / 'sample.py'), f'--out_dir={out}', '--start=A', '--num_samples=1',
           '--max_new_tokens=30', '--device=cpu']
    texts = []
    for convert in (False, True):
        if convert:
            subprocess.run([sys.executable, str(REPO / 'checkpoint.py'), str(out)], check=True,
                           capture_output=True)
            (out / 'ckpt_shards' / 'meta.pt').unlink()  # only ckpt.pt is left to read
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=trainer.root)
        assert r.returncode == 0, r.stdout + r.stderr
        texts.append(r.stdout)
    assert texts[0] == texts[1] and len(texts[0]) > 30


def test_non_finite_steps_under_fsdp_stop_with_one_line_and_the_shards_intact(trainer, tmp_path):
    """a learning rate that blows up, continued from FSDP's shards at iteration 5 in FSDP: every rank
    skips the same 5 steps, the run stops with one line naming the shards, which still load as they
    were"""
    from checkpoint import read_shards
    out = tmp_path / 'blown'
    subprocess.run(['cp', '-r', str(half(trainer, 'fsdp').out_dir), str(out)], check=True)
    before = read_shards(out / 'ckpt_shards')
    r = trainer.run([*args('deepseek', *LAYOUTS['fsdp'][1]), '--init_from=resume', '--learning_rate=1e30',
                     '--min_lr=1e30', '--max_iters=40'], nproc=2, out_dir=out, cache=False)
    # one line, the same from each rank (torchrun's own report of the exit follows it)
    assert r.rc != 0 and f'File "{REPO / "train.py"}"' not in r.out, r.out[-3000:]
    errors = set(r.out.replace('train.py: error', '\ntrain.py: error').splitlines())
    errors = {e for e in errors if e.startswith('train.py: error')}
    assert len(errors) == 1, errors
    line = errors.pop()
    assert '5 steps in a row' in line and f"{out / 'ckpt_shards'} (iter 5) is intact" in line, line
    after = read_shards(out / 'ckpt_shards')
    assert after['iter_num'] == 5
    assert all(torch.equal(after['model'][k], v) for k, v in before['model'].items())
