"""Expert parallelism against the single-process reference: the MoE layer (tests/ep_worker.py under torchrun,
gloo), training at ep_size=2 against one process with the same global batch, checkpoints moving between
ep_size=2 and ep_size=1, and the errors for sizes that do not fit."""
import json

import pytest
import torch

from conftest import REPO, SCHEDULE, TINY, TRAIN, config, launcher, run_command, child_env

WORKER = REPO / 'tests' / 'ep_worker.py'


def config_args(name):
    return [*TINY, config(name), *SCHEDULE]  # the same runs as test_train.py's (shared through the cache)


def assert_same_losses(run, ref, rel, iters):
    got, want = run.losses(), ref.losses()
    assert set(iters) <= set(got), f"missing steps: {sorted(got)}\n{run.out[-3000:]}"
    bad = {i: (got[i], want[i]) for i in iters if got[i] != pytest.approx(want[i], rel=rel)}
    assert not bad, f"loss differs from the one-process run at steps {bad}"
    got, want = run.val_losses(), ref.val_losses()
    assert got and set(got) <= set(want), (got, want)
    bad = {i: (got[i], want[i]) for i in got if got[i] != pytest.approx(want[i], rel=rel)}
    assert not bad, f"val loss differs from the one-process run: {bad}"

# -----------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize('nproc', [2, 4])
def test_ep_layer_equals_single_process_layer(tmp_path, nproc):
    rc, out, err = run_command([*launcher(nproc), str(WORKER), str(tmp_path)], tmp_path, child_env(), timeout=240)
    assert rc == 0, out + err
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(nproc)]
    cases = set(results[0])
    expected = {f'{c}/ep{ep}' for c in ('softmax_bias', 'sigmoid', 'deepseek_shared', 'capacity', 'shared_llama_top1',
                                        'zero_tokens', 'switch_capacity', 'tcmoe', 'moepp', 'grouped_bias', 'remoe',
                                        'topp', 'expert_choice', 'sqrtsoftplus', 'quantile', 'latent')
                for ep in ([4, 2] if nproc == 4 else [2])}
    expected |= {f'global_balance_{r}/dp{nproc}' for r in ('softmax', 'topp')}  # balance_scope='global', no EP
    expected |= {f'autocast_bf16/ep{ep}' for ep in ([4, 2] if nproc == 4 else [2])}
    assert cases == expected
    bad = [f'rank {r} {case}: {msg}' for r, res in enumerate(results) for case in sorted(res) for msg in res[case]['bad']]
    assert not bad, '\n'.join(bad)
    for case in cases:  # the cases exercise what they are named after
        if case.startswith('global_balance'):
            continue  # checked inside the worker: the counts of the other ranks change the loss
        if case.startswith('autocast_bf16'):
            # tokens and weights out, outputs back; in the backward the same three with the splits swapped
            assert all(res[case]['sent'] == ['torch.bfloat16'] * 6 for res in results), results[0][case]
            continue
        if case.startswith('zero_tokens'):
            assert all(res[case]['load'][0] == 0 for res in results)  # an expert nobody sends to
            assert all(res[case]['sends'][0] == 0 for res in results[1:])  # ranks that send nothing to EP rank 0
            assert results[0][case]['sends'][0] > 0
        elif case.startswith(('capacity', 'switch_capacity')):
            assert any(res[case]['dropped'] > 0 for res in results)
        else:  # ordinary routing: every rank sends to at least one other EP rank
            assert all(sum(1 for s in res[case]['sends'] if s > 0) > 1 for res in results)

# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize('name', ['softmax', 'deepseek'])  # sigmoid under EP: the layer test (ep_worker.py)
def test_ep2_training_equals_one_process(trainer, name):
    ref = trainer.run(config_args(name)).check()
    ep = trainer.run([*config_args(name), '--ep_size=2'], nproc=2).check()
    assert 'ep_size 2' in ep.out
    assert_same_losses(ep, ref, rel=1e-5, iters=range(1, 11))
    for a, b in zip(ep.train, ref.train):
        assert a['aux_loss'] == pytest.approx(b['aux_loss'], rel=1e-5), (a, b)
        assert a['load_cv'] == pytest.approx(b['load_cv'], rel=1e-5, abs=1e-6), (a, b)


def test_two_ep_groups_training_equals_one_process(trainer):
    """4 processes at ep_size=2: two EP groups, expert gradients also summed between the groups"""
    args = [*config_args('deepseek'), '--gradient_accumulation_steps=4', '--max_iters=5']
    ref = trainer.run(args).check()
    ep = trainer.run([*args, '--ep_size=2'], nproc=4).check()
    assert '4 processes, ep_size 2' in ep.out
    assert_same_losses(ep, ref, rel=1e-5, iters=range(1, 6))
    a = torch.load(ref.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)['optimizer']
    b = torch.load(ep.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)['optimizer']
    for n, s in a.items():  # Adam's moments: a wrong expert gradient scale shows here, not in the loss
        for k, t in s.items():
            assert close(b[n][k], t, 1e-4), (n, k)


def test_ep_eval_with_eval_iters_not_divisible_by_world_size(trainer):
    """3 eval batches over 2 ranks: every rank of an EP group must take part in every forward (all-to-all)"""
    args = [*TINY, config('softmax'), '--max_iters=0', '--eval_iters=3']
    ref = trainer.run(args).check()
    ep = trainer.run([*args, '--ep_size=2'], nproc=2, timeout=45)
    assert ep.rc == 0, (f"ep_size=2 with eval_iters=3 failed or hung (exit {ep.rc}):\n"
                        f"{ep.out[:600]}...{ep.out[-200:]}")
    assert ep.val_losses()[0] == pytest.approx(ref.val_losses()[0], rel=1e-5)


def half_args(name, *extra):
    return [*config_args(name), '--max_iters=5', *extra]


def test_checkpoint_written_at_ep2_holds_the_whole_model(trainer):
    one = trainer.run(half_args('deepseek')).check()
    two = trainer.run(half_args('deepseek', '--ep_size=2'), nproc=2).check()
    a = torch.load(one.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    b = torch.load(two.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 5 and b['model_args']['ep_size'] == 1
    assert a['model'].keys() == b['model'].keys() and a['optimizer'].keys() == b['optimizer'].keys()
    assert b['model']['transformer.h.0.mlp.experts.c_fc'].shape[0] == 8
    # equal up to float32 noise; Adam turns the noise of near-zero gradients into differences of up to ~1e-3 lr
    for k, t in a['model'].items():
        assert t.shape == b['model'][k].shape and close(b['model'][k], t, 2e-4), k
    for n, s in a['optimizer'].items():  # moments: a wrong expert gradient scale or slice shows here
        for k, t in s.items():
            assert close(b['optimizer'][n][k], t, 1e-4), (n, k)


def close(got, want, rel):
    """max abs difference within rel of the tensor's largest entry"""
    return (got - want).abs().max().item() <= rel * want.abs().max().item() + 1e-12


@pytest.mark.parametrize('before, after', [(2, 1), (1, 2)])
def test_checkpoint_moves_between_ep_sizes(trainer, before, after):
    full = trainer.run(config_args('deepseek')).check()
    half = trainer.run(half_args('deepseek', f'--ep_size={before}'), nproc=before).check()
    resumed = trainer.resume(half.out_dir, [*config_args('deepseek'), f'--ep_size={after}'], nproc=after).check()
    assert f'ep_size {after}' in resumed.out and sorted(resumed.losses()) == list(range(6, 11))
    assert_same_losses(resumed, full, rel=1e-5, iters=range(6, 11))

# -----------------------------------------------------------------------------
# global-batch balance through train.py


def test_global_balance_two_processes_train_as_one_process_holding_the_batch(trainer):
    """balance_scope='global' at 2 processes, one micro-batch of 4 sequences each, against one process whose one
    micro-batch holds the same 8 sequences (train.py's sampler draws the step's global batch from the seed) with the
    micro-batch scope: f from every rank's counts (set_balance_group), P local, DDP's mean gradient = the whole batch's.
    The per-rank 'batch' scope at 2 processes differs (the check has something to find)."""
    base = [*TINY, config('softmax'), *SCHEDULE, '--max_iters=5', '--aux_loss_coef=0.5']
    ref = trainer.run([*base, '--gradient_accumulation_steps=1', '--batch_size=8']).check()
    two = trainer.run([*base, '--balance_scope=global'], nproc=2).check()  # TINY: 2 micro-batches of 4 over 2 ranks
    local = trainer.run(base, nproc=2).check()
    got, want = two.losses(), ref.losses()
    assert sorted(got) == sorted(want) == list(range(1, 6))
    for a, b in zip(sorted(two.train, key=lambda r: r['iter']), sorted(ref.train, key=lambda r: r['iter'])):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5), (a, b)
        assert a['aux_loss'] == pytest.approx(b['aux_loss'], rel=1e-5), (a, b)
    assert any(a['aux_loss'] != pytest.approx(b['aux_loss'], rel=1e-4) for a, b in zip(local.train, ref.train))
    a = torch.load(ref.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)['model']
    b = torch.load(two.out_dir / 'ckpt.pt', map_location='cpu', weights_only=True)['model']
    for k, t in a.items():  # float32 noise, which Adam turns into up to ~1e-3 lr where gradients are near zero
        assert close(b[k], t, 2e-4), (k, (b[k] - t).abs().max().item())

# -----------------------------------------------------------------------------
# sizes that do not fit


@pytest.mark.parametrize('nproc, extra, message', [
    (2, ['--n_experts=3', '--top_k=1', '--ep_size=2'], 'train.py: error: n_experts=3 is not divisible by ep_size=2'),
    (2, ['--ep_size=4'], 'train.py: error: world size 2 is not divisible by ep_size=4'),
    (1, ['--ep_size=2'], 'train.py: error: world size 1 is not divisible by ep_size=2'),
])
def test_sizes_that_do_not_fit_are_one_clear_error(trainer, nproc, extra, message):
    r = trainer.run([*TINY, config('softmax'), *extra], nproc=nproc, cache=False, timeout=120)
    assert r.rc != 0
    lines = {line for line in r.out.splitlines() if 'train.py: error' in line}  # one line (printed by each rank)
    assert len(lines) == 1 and lines.pop().startswith(message), r.out[-3000:]
    assert f'File "{TRAIN}"' not in r.out  # no traceback from train.py
    assert not r.train
