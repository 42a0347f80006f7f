"""Every setting of every script has its allowed values, declared once next to it (cli.py: a range, a list of
choices, a kind of path or 'text'), and each is checked before the script does any work. The reference is each
range as written in its table, read here by a parser of its own: a value just outside each end is refused in one
line naming the setting and the range, the ends inside are accepted; each choice is accepted and another value
refused; each kind of path refuses what it must not be. A numeric setting without a range fails here. Then each
script with one value out of range, through its own entry point: one line, no traceback, nothing written. The
settings are parsed in-process (cli.parse, as each script calls it); only train.py and bench.py, which run at
import, run as programs (once each, at the same time)."""
import ast
import math
import re
import subprocess
import sys

import pytest

from conftest import REPO, child_env

sys.path.insert(0, str(REPO))
import cli  # noqa: E402
import model  # noqa: E402
import moe  # noqa: E402
from cli import settings_of  # noqa: E402

TRAIN, BENCH = REPO / 'train.py', REPO / 'bench.py'
SCRIPTS = ('train.py', 'sample.py', 'eval.py', 'prepare.py', 'upcycle.py', 'export.py', 'study.py', 'bench.py')
PATH_KINDS = ('path', 'file', 'folder', 'run', 'writable')


def declared(path, name):
    """the value of a script's module-level `name = dict(...)` of constants, read without running the script
    (train.py and bench.py run at import)"""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', None) == name:
            return {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
    raise AssertionError(f"{path} declares no {name}")


def table(script):
    """(settings and their defaults, their allowed values, the positional setting) as the script reads them"""
    if script == 'train.py':
        # train.py's list, with the settings of a router it does not list yet; the model's limits and its own
        defaults = {**moe.router_settings(), **settings_of(TRAIN)}
        return defaults, {**model.limits(), **declared(TRAIN, 'LIMITS')}, None
    if script == 'bench.py':
        return declared(BENCH, 'DEFAULTS'), declared(BENCH, 'LIMITS'), None
    if script == 'sample.py':
        import sample
        return settings_of(REPO / 'sample.py'), sample.LIMITS, None
    import eval as ev
    import export
    import prepare
    import study
    import upcycle
    return dict(zip(SCRIPTS[2:7], [(ev.DEFAULTS, ev.LIMITS, 'runs'), (prepare.DEFAULTS, prepare.LIMITS, 'input'),
                                   (upcycle.DEFAULTS, upcycle.LIMITS, None), (export.SETTINGS, export.LIMITS, 'run'),
                                   (study.SETTINGS, study.LIMITS, None)]))[script]


NUMBER = r'(-?[0-9.e+-]+)'


def bounds(limit):
    """(low, low included, high, high included) of a range as its table writes it ('>= 1', '> 0', '[0, 1)'), or
    None when limit is not one"""
    if not isinstance(limit, str):
        return None
    m = re.fullmatch(r'(>=|>|<=|<) *' + NUMBER, limit)
    if m:
        op, x = m.group(1), float(m.group(2))
        return (x, op == '>=', math.inf, True) if op[0] == '>' else (-math.inf, True, x, op == '<=')
    m = re.fullmatch(r'([\[(]) *' + NUMBER + ', *' + NUMBER + r' *([\])])', limit)
    if m:
        return float(m.group(2)), m.group(1) == '[', float(m.group(3)), m.group(4) == ']'
    return None


def within(value, limit):
    low, low_in, high, high_in = bounds(limit)
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def numeric(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unlimited(script):
    """the settings of a script that its tables leave without allowed values: a number without a range, a text
    without choices, a kind of path or 'text'"""
    defaults, limits, _ = table(script)
    missing = []
    for key, default in defaults.items():
        limit = limits.get(key)
        if isinstance(default, bool):
            continue  # its type is its check
        if numeric(default):
            ok = bounds(limit) is not None
        elif isinstance(default, list):
            ok = limit in (*PATH_KINDS, 'text')
        else:
            ok = isinstance(limit, tuple) or limit in (*PATH_KINDS, 'text', *cli.CHOICES)
        if not ok:
            missing.append(key)
    return missing


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_setting_has_its_allowed_values(script):
    defaults, limits, _ = table(script)
    assert len(defaults) >= 4 and not unlimited(script), unlimited(script)
    # no table entry outlives its setting (train.py derives the model's vocab_size from the data)
    assert set(limits) - set(defaults) <= {'vocab_size'}, set(limits) - set(defaults)
    # a default inside its range or its choices, or the "unset" of a number (0) or of a required choice ('')
    for key, limit in limits.items():
        if key not in defaults:
            continue
        if isinstance(limit, tuple):
            assert defaults[key] in (*limit, ''), (key, defaults[key], limit)
        elif bounds(limit):
            assert within(defaults[key], limit) or defaults[key] == 0, (key, defaults[key], limit)


def test_a_router_knob_without_a_range_is_found(monkeypatch):
    """the walk above fails for a router (or any setting) added without its range"""
    class MadeUpRouter(moe.SoftmaxRouter):
        knobs = dict(made_up_rate=0.5, made_up_mode='fast')

    monkeypatch.setitem(moe.ROUTERS, 'made_up', MadeUpRouter)
    assert unlimited('train.py') == ['made_up_rate', 'made_up_mode']
    MadeUpRouter.limits = dict(made_up_rate='[0, 1]', made_up_mode=('fast', 'slow'))
    assert unlimited('train.py') == []
    assert 'made_up' in model.limits()['router']  # the router's choices are the registry's


def step(value, kind):
    return 1 if kind is int else 1e-6 * max(1.0, abs(value))


def outside(limit, kind):
    """values just outside each end of a range, of the setting's type"""
    low, low_in, high, high_in = bounds(limit)
    out = []
    if low > -math.inf:
        out.append(kind(low - step(low, kind)) if low_in else kind(low))
    if high < math.inf:
        out.append(kind(high + step(high, kind)) if high_in else kind(high))
    return out


def inside(limit, kind):
    """the ends of a range that it holds (or the nearest values of the setting's type)"""
    low, low_in, high, high_in = bounds(limit)
    out = []
    if low > -math.inf:
        out.append(kind(low) if low_in else kind(low + step(low, kind)))
    if high < math.inf:
        out.append(kind(high) if high_in else kind(high - step(high, kind)))
    return out


# what a script needs besides the setting under test: sample.py's default out_dir must be a run folder
BASE = {'sample.py': ['--out_dir=run']}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """the current folder: a file, an empty folder and a run folder (its ckpt.pt empty: only its name counts)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'ckpt.pt').write_bytes(b'')
    return tmp_path


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob('*'))


def parse(script, argv):
    defaults, limits, positional = table(script)
    return cli.parse(defaults, BASE.get(script, []) + argv, positional=positional, limits=limits)[0]


def ranges(script):
    defaults, limits, _ = table(script)
    return [(k, limits[k], type(v)) for k, v in defaults.items() if numeric(v)]


def test_the_scripts_with_numeric_settings():
    assert [s for s in SCRIPTS if ranges(s)] == [s for s in SCRIPTS if s not in ('export.py', 'study.py')]


@pytest.mark.parametrize('script', [s for s in SCRIPTS if s not in ('export.py', 'study.py')])
def test_values_outside_each_range_are_one_line_naming_it_and_the_edges_are_accepted(script, folder):
    before, cases = listing(folder), ranges(script)
    for key, limit, kind in cases:
        numbers = re.findall(NUMBER, limit)
        for value in outside(limit, kind):
            with pytest.raises(ValueError) as e:
                parse(script, [f'--{key}={value!r}'])
            line = str(e.value)
            assert '\n' not in line and line.startswith(f'{key}={value!r} must be ') and f'(--{key})' in line, line
            assert all(n in line for n in numbers), (line, limit)  # the range, as the table writes it
        for value in inside(limit, kind):
            assert parse(script, [f'--{key}={value!r}'])[key] == value, (key, value)
        if kind is float:
            assert 'must be' in cli.problem(key, math.nan, limit)
    assert listing(folder) == before  # nothing written


@pytest.mark.parametrize('script', SCRIPTS)
def test_each_choice_is_accepted_and_another_value_refused(script, folder):
    defaults, limits, _ = table(script)
    choices = {k: cli.CHOICES.get(v, v) for k, v in limits.items() if isinstance(cli.CHOICES.get(v, v), tuple)}
    for key, allowed in choices.items():
        for value in allowed:
            assert parse(script, [f'--{key}={value}'])[key] == value
        with pytest.raises(ValueError) as e:
            parse(script, [f'--{key}=no_such_choice'])
        line = str(e.value)
        assert line.startswith(f"{key}='no_such_choice' is not one of ") and f'(--{key})' in line, line
        assert all(repr(c) in line for c in allowed), line


def test_the_choices_are_every_scripts():
    """the lists that the scripts check against: train.py's routers, the dtypes, the tracks, the sections"""
    assert table('train.py')[1]['router'] == ('dense', *moe.ROUTERS)
    assert cli.CHOICES['dtype'] == ('auto', 'float32', 'bfloat16', 'float16')
    assert {s: table(s)[1]['dtype'] for s in ('train.py', 'sample.py', 'eval.py')} == dict.fromkeys(
        ('train.py', 'sample.py', 'eval.py'), 'dtype')
    assert table('bench.py')[1]['dtype'] == ('auto', 'float32', 'bfloat16')  # bench times no float16


@pytest.mark.parametrize('script', SCRIPTS)
def test_each_path_is_checked_before_any_work(script, folder):
    before = listing(folder)
    # kind -> (what it refuses, what it accepts)
    cases = dict(path=('missing', 'a_file'), file=('empty', 'a_file'), folder=('a_file', 'empty'),
                 run=('empty', 'run'), writable=('a_file/sub', 'new/sub'))
    defaults, limits, positional = table(script)
    paths = {k: v for k, v in limits.items() if v in PATH_KINDS}
    for key, kind in paths.items():
        bad, good = cases[kind]
        arg = (lambda v: [v]) if key == positional else (lambda v: [f'--{key}={v}'])
        with pytest.raises(ValueError) as e:
            parse(script, arg(bad))
        line = str(e.value)
        assert line.startswith(f"{key}='{bad}' ") and '\n' not in line, line
        assert parse(script, arg(good))[key] in (good, [good])
    assert listing(folder) == before  # nothing made, not new/
    assert paths or script == 'bench.py'


# one value out of range per script, through the script's own entry point: the table it checks is the one walked
# above, before any work
PROGRAMS = {
    'train.py': (['--beta1=1.0', '--device=cpu'], 'beta1=1.0 must be in [0, 1) (--beta1)'),
    'sample.py': (['--temperature=-1', '--out_dir=run'], 'temperature=-1.0 must be at least 0 (--temperature)'),
    'eval.py': (['run', '--tasks', 'piqa', '--limit', '-3'], 'limit=-3 must be at least 1 (--limit)'),
    'prepare.py': (['--val_fraction=0', '--out_root=data'], 'val_fraction=0.0 must be in (0, 1) (--val_fraction)'),
    'upcycle.py': (['--init_from=run', '--router_init_std=-0.1', '--out_dir=up'],
                   'router_init_std=-0.1 must be at least 0 (--router_init_std)'),
    'export.py': (['empty', '--out_dir', 'hf'], "run='empty' must be a run folder, one holding ckpt.pt"),
    'study.py': (['--scale', 'cpu', '--out', 'a_file'], "out='a_file' cannot be written (a_file is a file"),
    'bench.py': (['--reps=0'], 'reps=0 must be at least 1 (--reps)'),
}
# train.py and bench.py run at import: as programs (also the exit status and stderr of the one-line error)
AS_PROGRAMS = ('train.py', 'bench.py')


@pytest.mark.parametrize('script', [s for s in SCRIPTS if s not in AS_PROGRAMS])
def test_each_script_refuses_a_value_out_of_range_in_one_line_and_writes_nothing(script, folder):
    import importlib
    before, (argv, message) = listing(folder), PROGRAMS[script]
    main = importlib.import_module(script.removesuffix('.py')).main
    with pytest.raises(SystemExit) as e, cli.errors(script):
        main(argv)
    line = str(e.value.code)
    assert '\n' not in line and line.startswith(f'{script}: error: ') and message in line, line
    assert listing(folder) == before


def test_train_and_bench_refuse_a_value_out_of_range_in_one_line_and_write_nothing(folder):
    before = listing(folder)
    procs = {s: subprocess.Popen([sys.executable, str(REPO / s), *PROGRAMS[s][0]], cwd=folder, env=child_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in AS_PROGRAMS}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and 'Traceback' not in err, (script, out, err)
        assert lines[0].startswith(f'{script}: error: ') and PROGRAMS[script][1] in lines[0], lines[0]
    assert listing(folder) == before
