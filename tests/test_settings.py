"""Each setting declared once and present wherever it must be. GPTConfig's fields (model.py) and every
router's options and knobs (moe.py) are train.py settings (read from train.py's text as cli.settings_of
reads it), the routers' with their defaults; the training knobs are model.knobs(), the ones
docs/training.md lists, and a run from a checkpoint takes each of them when given (train.py itself, run);
a made-up router's new knob becomes a knob, and a setting train.py must list, by itself."""
import json
import re
import sys
from dataclasses import MISSING, asdict, fields

import torch

from conftest import REPO, TINY, TRAIN

sys.path.insert(0, str(REPO))
import moe  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from cli import settings_of  # noqa: E402
from model import GPT, GPTConfig, knobs  # noqa: E402

# train.py derives these: vocab_size from the data, router_options from the router settings
DERIVED = {'vocab_size', 'router_options'}


def train_settings():
    return settings_of(TRAIN)


def missing_from_train():
    """the model's settings that train.py does not list"""
    model = {f.name for f in fields(GPTConfig)} - DERIVED
    return (model | set(moe.router_settings())) - set(train_settings())


def test_every_model_field_is_a_train_setting_of_its_type():
    ours = train_settings()
    assert len(ours) > 80 and ours['dataset'] == 'shakespeare_char'  # the reader read the whole list
    assert not missing_from_train()
    assert not DERIVED & set(ours)  # declared once: train.py derives them
    for f in fields(GPTConfig):
        if f.name not in DERIVED:
            assert f.default is not MISSING and type(ours[f.name]) is type(f.default), f.name


def test_every_router_setting_is_a_train_setting_with_the_routers_default():
    ours = train_settings()
    declared = {}  # name -> {router: default}
    for name, cls in moe.ROUTERS.items():
        for k, v in cls.settings().items():
            declared.setdefault(k, {})[name] = v
    assert len(declared) >= 19  # the reference: each router class's own attributes
    for k, by_router in declared.items():
        assert len(set(map(repr, by_router.values()))) == 1, f"{k} has several defaults: {by_router}"
        default = next(iter(by_router.values()))
        assert k in ours and ours[k] == default and type(ours[k]) is type(default), (k, ours.get(k), default)


# what a run from a checkpoint let change before the list was derived from the marks (train.py's own list)
KNOBS = ('dropout', 'capacity_factor', 'eval_capacity_factor', 'aux_loss_coef', 'z_loss_coef', 'router_jitter',
         'hyper_k_schedule', 'hyper_k_min', 'bias_update_rate', 'null_reward', 'moepp_tau', 'balance_scope',
         'force_balance', 'remoe_l1_init', 'remoe_l1_alpha', 'topp_threshold', 'topp_max', 'topp_entropy_coef',
         'ec_capacity_factor', 'bias_recentre', 'qb_ema')


def test_the_knobs_are_the_marked_ones_and_the_documented_ones():
    assert sorted(knobs()) == sorted(KNOBS) and len(set(knobs())) == len(knobs())
    text = (REPO / 'docs' / 'training.md').read_text()
    section = text.split('### What a checkpoint fixes', 1)[1].split('A value given', 1)[0]
    listed = re.findall(r'`(\w+)`', section.split('knobs', 1)[1].split('):', 1)[1])
    assert sorted(listed) == sorted(knobs())
    assert set(knobs()) <= set(train_settings())


def other_value(k, v):
    """a valid value of knob k other than its default v"""
    if isinstance(v, bool):
        return not v
    if isinstance(v, str):
        return {'balance_scope': 'sequence'}[k]  # a new string knob needs its entry here
    if isinstance(v, int):
        return v + 1
    return v * 2 if v else 0.1


def test_a_run_from_a_checkpoint_takes_every_knob_given(trainer):
    """train.py init_from=<folder> with every knob given at another value: no contradiction, the checkpoint
    it writes and config.json hold each value (the model's fields, and its router's own knobs)"""
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=59, router='deepseek')
    torch.manual_seed(0)
    start = trainer.root / 'out' / 'knobs_start'
    start.mkdir(parents=True)
    save_checkpoint(start, dict(model=GPT(cfg).state_dict(), model_args=asdict(cfg), iter_num=0,
                                best_val_loss=1e9, config={}, tokenizer='char'))
    defaults = {**asdict(cfg), **moe.router_settings()}
    given = {k: other_value(k, defaults[k]) for k in knobs()}
    args = [*TINY, f'--init_from={start}', '--max_iters=1', '--eval_interval=1', '--always_save_checkpoint=True',
            *(f'--{k}={v}' for k, v in given.items())]
    r = trainer.run(args, cache=False).check()
    used = json.loads((r.out_dir / 'config.json').read_text())
    assert {k: used[k] for k in given} == given
    args = torch.load(r.out_dir / 'ckpt.pt', weights_only=True)['model_args']
    ran = {**args, **args['router_options']}
    own = set(cfg.router_options) | {f.name for f in fields(GPTConfig)}
    assert {k: ran[k] for k in given if k in own} == {k: v for k, v in given.items() if k in own}
    assert 'bias_update_rate' in own and 'dropout' in own  # both kinds were checked


def test_a_new_routers_knob_shows_up_by_itself(monkeypatch):
    class MadeUpRouter(moe.SoftmaxRouter):
        options = dict(made_up_width=3)
        knobs = dict(made_up_rate=0.5)

    monkeypatch.setitem(moe.ROUTERS, 'made_up', MadeUpRouter)
    assert 'made_up_rate' in knobs() and 'made_up_width' not in knobs()
    assert moe.router_settings()['made_up_width'] == 3 and moe.router_knobs()['made_up_rate'] == 0.5
    assert GPTConfig(router='made_up').router_options == dict(made_up_width=3, made_up_rate=0.5)
    # train.py does not list them: the test above fails for such a router until train.py does
    assert missing_from_train() == {'made_up_width', 'made_up_rate'}
    monkeypatch.undo()
    assert not missing_from_train()


def test_the_machine_settings_are_the_documented_ones():
    """the settings a resume never takes from the checkpoint: train.py's machine settings and GPTConfig's
    'system' fields, as docs/training.md lists them; each a train.py setting"""
    from model import settings
    text = (REPO / 'docs' / 'training.md').read_text()
    listed = re.findall(r'`(\w+)`', text.split("except the machine's (", 1)[1].split(')', 1)[0])
    assert sorted(listed) == sorted(['init_from', 'out_dir', 'device', 'compile', 'parallel', 'save_sharded',
                                     *settings('system')])
    assert set(listed) <= set(train_settings())
