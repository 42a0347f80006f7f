"""
How every script starts: its command line, its device and dtype, and its one-line error exit.

- One command-line reader for every script, nanoGPT's configurator made strict. A script's settings
  are a dict of defaults; config files (plain Python, run left to right) and `--key=value` /
  `--key value` overrides change them. A boolean may be given as a bare `--flag`; a list setting
  takes every value up to the next `--` and repeats add to it; a script with a positional setting
  (eval.py's run folders) gets its bare arguments there instead of config files, and its list
  settings take one value per `--key` (argparse's append). A key must be a setting and keep its
  type: a typo is an error, not a new name.
- Each script declares its settings' allowed values once, next to them, as a table (LIMITS): a
  range ('>= 1', '> 0', '[0, 1)'), a tuple of choices, a kind of path ('run', 'file', 'writable',
  ...) or 'text'. parse checks each value given (on the command line or in a config file), and
  every path, before the script does any work; a default outside its range is the script's own
  "unset" (eval.py's limit=0: every document). tests/test_arguments.py walks every table and fails
  on a setting without one.
- `dtype='auto'` picks bfloat16 only where the hardware runs bf16 matmuls fast: a CUDA GPU of
  compute capability 8.0 or more, or a CPU with AMX or AVX-512 BF16. An AVX2-only CPU emulates bf16
  about 100x slower than fp32 (docs/performance.md). Evaluation passes the dtype it wants; autocast
  is off in float32.
- Expected errors (bad input, a bad file, no network) are one line `script.py: error: ...` and exit
  status 1, raised as ValueError or OSError anywhere and turned into that line by `errors(prog)`
  around a script's main. Ctrl-C is one line too (`on_interrupt`), on every rank of a torchrun job.
"""
import ast
import math
import operator
import os
import re
import signal
import sys
import traceback
import types
from contextlib import contextmanager, nullcontext

import torch

DTYPES = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)

# -----------------------------------------------------------------------------
# the command line


def convert(text, default):
    """the value of `--key=text` for a setting whose default is `default`: a Python literal, or the
    text itself (always, for a text setting, unless it is a quoted string)"""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(default, str) and not isinstance(value, str):
        return text
    return value


def parse(defaults, argv, extra=(), positional=None, limits=None):
    """(config, given): defaults (name -> value) updated by argv left to right, and {key: where} for
    each key that argv set (the last place wins; a config file's assignment counts even when it
    repeats the current value). extra: another stage's keys, accepted without a type check.
    positional: the name of the list setting that takes the bare arguments (else they are config
    files). limits: each setting's allowed values (check), checked for the keys given."""
    config, given = dict(defaults), {}

    def put(key, value, where):
        if key not in defaults and key not in extra:
            raise ValueError(f"unknown config key '{key}' in {where}; "
                             f"known keys: {', '.join(sorted(defaults))}")
        expected = type(defaults.get(key, value))
        value = float(value) if expected is float and type(value) is int else value
        if type(value) is not expected:
            raise ValueError(f"config key '{key}' in {where} must be {expected.__name__}, "
                             f"got {value!r}")
        config[key], given[key] = value, where

    def add(key, values, where):
        """a list setting: the values given on the command line
        replace the default, then accumulate"""
        config[key] = (config[key] if key in given else []) + values
        given[key] = where

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ('-h', '--help'):
            print(usage(defaults, positional))
            raise SystemExit(0)
        if not arg.startswith('--'):
            if positional is not None:
                add(positional, [arg], 'the command line')
            else:
                run_config_file(arg, config, put)
            continue
        key, eq, text = arg[2:].partition('=')
        if key not in defaults and key not in extra:
            raise ValueError(f"unknown config key '{key}' in --{key}; "
                             f"known keys: {', '.join(sorted(defaults))}")
        default = defaults.get(key)
        if isinstance(default, list):
            values = [text] if eq else []
            # in a script with positional arguments a list setting
            # takes one value per --key (the rest are those)
            while (not eq and i < len(argv) and not argv[i].startswith('--')
                   and not (positional and values)):
                values.append(argv[i])
                i += 1
            if not values:
                raise ValueError(f"'{arg}' needs a value: write {arg}=VALUE")
            add(key, values, f"--{key}")
            continue
        if not eq:
            takes_next = (i < len(argv) and not argv[i].startswith('--')
                          and not isinstance(default, bool))
            if isinstance(default, bool) and i < len(argv) and argv[i] in ('True', 'False'):
                takes_next = True
            if isinstance(default, bool) and not takes_next:
                put(key, True, f"--{key}")
                continue
            if not takes_next:
                raise ValueError(f"'{arg}' needs a value: write {arg}=VALUE")
            text = argv[i]
            i += 1
        put(key, convert(text, default), f"--{key}")
    check(config, limits or {}, given)
    return config, given


def configure(defaults, argv, extra=(), positional=None, limits=None):
    """parse's config alone"""
    return parse(defaults, argv, extra, positional, limits)[0]


def run_config_file(path, config, put):
    """a config file: plain Python run with the current settings as
    its globals; what it assigns is put"""
    try:
        source = open(path).read()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}")
    try:
        tree = ast.parse(source, path)
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}")
    assigned = {n.id for n in ast.walk(tree)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    scope = dict(config)
    try:
        exec(compile(tree, path, 'exec'), scope)
    except Exception as e:
        # the file's own mistake (a NameError, ...): where it happened, in one line
        frames = traceback.extract_tb(e.__traceback__)
        line = next((f.lineno for f in reversed(frames) if f.filename == path), '?')
        raise ValueError(f"config file {path}, line {line}: {type(e).__name__}: {e}")
    for key, value in scope.items():
        unchanged = key in config and value is config[key] and key not in assigned
        if not (key.startswith('_') or isinstance(value, types.ModuleType) or unchanged):
            put(key, value, path)


def usage(defaults, positional=None):
    """--help: every setting and its default"""
    prog = os.path.basename(sys.argv[0])
    head = (f"usage: {prog} "
            + (f"{positional.upper()}... " if positional else "[CONFIG.py ...] ")
            + "[--key=value ...]")
    lines = [f"  --{k}={v!r}" for k, v in defaults.items() if k != positional]
    return '\n'.join([head, 'settings and their defaults:', *lines])


def settings_of(path):
    """the settings of a nanoGPT-style script without running it: the module-level assignments of
    constants (name = literal) before the script's first other statement that is not an import,
    function or docstring"""
    out = {}
    for node in ast.parse(open(path).read()).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                break
        elif not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr, ast.FunctionDef)):
            break
    return out

# -----------------------------------------------------------------------------
# allowed values: a setting's limit is a range, a tuple of choices, a kind of path or 'text'

RANGE = re.compile(r'(>=|>|<=|<) *(\S+)$')  # '>= 1'
INTERVAL = re.compile(r'([\[(]) *([^,]+), *([^\])]+?) *([\])])$')  # '[0, 1)'
OPS = {'>=': operator.ge, '>': operator.gt, '<=': operator.le, '<': operator.lt}
# named choices: every script's dtype setting
CHOICES = dict(dtype=('auto', *DTYPES))
# a kind of path -> (whether a value is one, what it must be)
PATHS = dict(
    path=(os.path.exists, "does not exist"),
    file=(os.path.isfile, "must be a file that exists"),
    folder=(os.path.isdir, "must be a folder that exists"),
    run=(lambda p: os.path.isfile(os.path.join(p, 'ckpt.pt'))
         or os.path.isfile(os.path.join(p, 'ckpt_shards', 'meta.pt')),
         "must be a run folder, one holding ckpt.pt or ckpt_shards/ (train.py's out_dir or "
         "upcycle.py's)"),
    writable=(lambda p: writable(p) is None, "cannot be written"),
)


def in_range(value, limit):
    """whether a number is inside a range ('>= 1', '> 0', '<= 1', '< 1', '[0, 1)', '(0, 1]')"""
    m = RANGE.match(limit)
    if m:
        return OPS[m.group(1)](value, float(m.group(2)))
    m = INTERVAL.match(limit)
    if not m:
        raise ValueError(f"limit {limit!r} is not a range, a kind of path or 'text'")
    low, high = float(m.group(2)), float(m.group(3))
    above = value > low if m.group(1) == '(' else value >= low
    return above and (value < high if m.group(4) == ')' else value <= high)


def range_words(limit):
    """'>= 1' -> 'at least 1', '> 0' -> 'above 0', '[0, 1)' -> 'in [0, 1)'"""
    m = RANGE.match(limit)
    if not m:
        return f"in {limit}"
    words = {'>=': 'at least', '>': 'above', '<=': 'at most', '<': 'below'}
    return f"{words[m.group(1)]} {m.group(2)}"


def writable(path):
    """why a folder cannot be made or written at path, or None: it is a file, or the nearest
    folder that exists above it is not writable"""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def problem(key, value, limit):
    """why value is not allowed for setting key (one line without where it was set), or None.
    limit: a range of numbers, a tuple of choices or the name of one (CHOICES), a kind of path
    (PATHS: '' = unset is allowed) or 'text' (anything); a list is checked item by item"""
    if isinstance(value, list):
        return next((p for p in (problem(key, v, limit) for v in value) if p), None)
    limit = CHOICES.get(limit, limit)
    if isinstance(limit, tuple):
        if value in limit:
            return None
        return f"{key}={value!r} is not one of {', '.join(map(repr, limit))}"
    if limit == 'text' or (limit in PATHS and value == ''):
        return None
    if limit in PATHS:
        ok, must = PATHS[limit]
        if ok(value):
            return None
        why = writable(value) if limit == 'writable' else None
        return f"{key}={value!r} {must}" + (f" ({why}): choose another folder" if why else "")
    if not math.isfinite(value) or not in_range(value, limit):
        return f"{key}={value!r} must be {range_words(limit)}"
    return None


def check(config, limits, given):
    """ValueError (one line) for the first setting outside its limit (problem): of the settings
    given (key -> where it was set), and of every path, given or not (a default path must exist
    too); settings without a limit are not checked"""
    defaults = [k for k, limit in limits.items() if limit in PATHS and k not in given]
    for key in [k for k in given if k in limits] + [k for k in defaults if k in config]:
        why = problem(key, config[key], limits[key])
        if why:
            raise ValueError(f"{why} ({given.get(key, 'the default')})")

# -----------------------------------------------------------------------------
# errors


def fail(message, prog=None):
    """an expected error: one line naming the problem and the fix, exit status 1"""
    prog = prog or os.path.basename(sys.argv[0])
    sys.exit(f"{prog}: error: {' '.join(str(message).split())}")


def on_interrupt(report):
    """Ctrl-C (SIGINT, which torchrun passes to every rank; a scheduler's SIGTERM too) ends the
    process with report() (one line saying where things stand) and exit status 130, not a traceback
    from every rank: a rank whose peer stopped first sees a failed collective, the same
    interruption"""
    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    def on_uncaught(kind, value, tb):
        if not (issubclass(kind, KeyboardInterrupt) or interrupted):
            return sys.__excepthook__(kind, value, tb)
        report()
        sys.stdout.flush()
        # no teardown: the process group and DDP would wait for ranks that are gone
        os._exit(130)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sys.excepthook = on_uncaught


@contextmanager
def errors(prog):
    """ValueError and OSError inside (bad input, a bad file, no
    network) end the script with fail's one line"""
    try:
        yield
    except (ValueError, OSError) as e:
        fail(e, prog)

# -----------------------------------------------------------------------------
# device and dtype


def pick_device(device):
    """'auto' -> 'cuda' where torch sees a GPU, else 'cpu'; a named
    device is checked (ValueError, one line)"""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device torch knows: "
                         f"use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if d.type not in ('cpu', 'cuda'):
        raise ValueError(f"device={device!r}: use 'cpu' or 'cuda' "
                         f"('auto' picks cuda where there is one)")
    if d.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch ({torch.__version__}) "
                         f"sees no CUDA device: use --device=cpu or auto")
    if d.type == 'cuda' and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but there are {torch.cuda.device_count()} "
                         f"CUDA devices (cuda:0 ...)")
    return device


def auto_dtype(device_type):
    """the dtype for dtype='auto' -> (name, why): bfloat16 where the
    hardware runs bf16 matmuls fast, else float32"""
    if device_type == 'cuda':
        name = torch.cuda.get_device_name()
        # native bf16 only (compute capability >= 8.0): V100 and T4 would emulate it, slowly
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return 'bfloat16', f'{name} runs bf16'
        return 'float32', f'{name} has no native bf16'
    flags = set()
    if os.path.exists('/proc/cpuinfo'):
        for line in open('/proc/cpuinfo'):
            if line.startswith('flags'):
                flags.update(line.split(':')[1].split())
    fast = [f for f in ('amx_bf16', 'avx512_bf16') if f in flags]
    if fast:
        return 'bfloat16', f'the CPU has {fast[0]} (fast bf16 matmuls)'
    return 'float32', ('the CPU has neither AMX nor AVX-512 BF16 '
                       '(bf16 matmuls would be far slower than fp32)')


# dense bf16 / fp16 tensor-core peak FLOP/s of a GPU model, for MFU: half the BF16 "with sparsity"
# figures of NVIDIA's data sheets (H100: SXM 1,979, PCIe 1,513, NVL 1,671 TFLOPS; H200: SXM 1,979,
# NVL 1,671; A100, SXM and PCIe: 624), rounded down
GPU_PEAKS = {'A100': 312e12, 'A100 PCIe': 312e12, 'H100': 989e12, 'H100 PCIe': 756e12,
             'H100 NVL': 835e12, 'H200': 989e12, 'H200 NVL': 835e12}


def gpu_model(name):
    """a CUDA device name's model: its chip and a PCIe or NVL variant ('NVIDIA H100 80GB HBM3' ->
    'H100', 'NVIDIA H100 NVL' -> 'H100 NVL', 'NVIDIA A100-PCIE-40GB' -> 'A100 PCIe')"""
    words = name.removeprefix('NVIDIA ').replace('-', ' ').split()
    tail = {w.upper() for w in words[1:]}
    return ' '.join(words[:1] + [v for v in ('PCIe', 'NVL') if v.upper() in tail])


def gpu_peak(name):
    """GPU_PEAKS of the device name's model, matched exactly; 0.0 (no MFU) for another model"""
    return GPU_PEAKS.get(gpu_model(name), 0.0)


def pick_dtype(dtype, device_type):
    """(name, why): dtype itself, or auto_dtype's choice for 'auto'
    (why is None when it was given)"""
    if dtype == 'auto':
        return auto_dtype(device_type)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of 'auto', {', '.join(map(repr, DTYPES))}")
    return dtype, None


def autocast(device_type, dtype):
    """the forward's context: autocast to dtype (a name), or nothing in float32"""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])
