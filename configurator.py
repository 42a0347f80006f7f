"""
nanoGPT's "poor man's configurator", made strict. Used by train.py and upcycle.py:

    python train.py configs/sigmoid.py configs/gpu.py --batch_size=32 --router=softmax

Arguments without '=' are config files: plain Python, run in order (left to right), that set names among
the defaults (they may compute values from the ones set before them). --key=value overrides come after.
Every name must exist among the defaults and keep its type (an int where a float is expected is fine);
anything else, a syntax error or an exception inside a config file included, is a ValueError with one
clear line. parse() also says which keys were given and where (train.py checks them against a checkpoint).
"""
import ast
import traceback
import types


def configure(defaults, argv, extra=()):
    """defaults (name -> value) updated by the config files and --key=value overrides in argv, left to right;
    names in extra (another stage's keys) are accepted without a type check"""
    return parse(defaults, argv, extra)[0]


def parse(defaults, argv, extra=()):
    """(config, given): configure's config, and {key: where} for each key that argv set (the last place wins;
    a config file's assignment counts even when it repeats the current value)"""
    config, given = dict(defaults), {}

    def put(key, value, where):
        if key not in defaults and key not in extra:
            raise ValueError(f"unknown config key '{key}' in {where}; known keys: {', '.join(sorted(defaults))}")
        expected = type(defaults.get(key, value))
        value = float(value) if expected is float and type(value) is int else value
        if type(value) is not expected:
            raise ValueError(f"config key '{key}' in {where} must be {expected.__name__}, got {value!r}")
        config[key], given[key] = value, where

    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ValueError(f"'{arg}' needs a value: write {arg}=VALUE")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a plain string
            put(key, value, f"--{key}")
        else:
            try:
                source = open(arg).read()
            except OSError as e:
                raise ValueError(f"cannot read config file {arg}: {e.strerror}")
            try:
                tree = ast.parse(source, arg)
            except SyntaxError as e:
                raise ValueError(f"config file {arg}, line {e.lineno}: {e.msg}")
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            scope = dict(config)
            try:
                exec(compile(tree, arg, 'exec'), scope)
            except Exception as e:  # the file's own mistake (a NameError, ...): where it happened, in one line
                line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == arg), '?')
                raise ValueError(f"config file {arg}, line {line}: {type(e).__name__}: {e}")
            for key, value in scope.items():
                unchanged = key in config and value is config[key] and key not in assigned
                if not (key.startswith('_') or isinstance(value, types.ModuleType) or unchanged):
                    put(key, value, arg)
    return config, given
