"""
nanoGPT's "poor man's configurator", made strict. Used by train.py and upcycle.py:

    python train.py configs/sigmoid.py configs/gpu.py --batch_size=32 --router=softmax

Arguments without '=' are config files: plain Python, run in order (left to right), that set names among
the defaults (they may compute values from the ones set before them). --key=value overrides come after.
Every name must exist among the defaults and keep its type (an int where a float is expected is fine);
anything else is an error with one clear line, also inside a config file.
"""
import ast


def check(key, value, defaults, where):
    if key not in defaults:
        raise SystemExit(f"error: unknown config key '{key}' in {where}; known keys: {', '.join(sorted(defaults))}")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise SystemExit(f"error: config key '{key}' in {where} must be {expected.__name__}, got {value!r}")
    return value


def configure(defaults, argv):
    """defaults (name -> value) updated by the config files and --key=value overrides in argv"""
    config = dict(defaults)
    for arg in argv:
        if '=' not in arg:
            if arg.startswith('--'):
                raise SystemExit(f"error: '{arg}' needs a value: write {arg}=VALUE")
            try:
                source = open(arg).read()
            except OSError as e:
                raise SystemExit(f"error: cannot read config file {arg}: {e.strerror}")
            scope = dict(config)
            exec(compile(source, arg, 'exec'), scope)
            for key, value in scope.items():
                if key.startswith('_') or type(value).__name__ == 'module' or (key in config and value is config[key]):
                    continue
                config[key] = check(key, value, defaults, arg)
        else:
            key, value = arg.split('=', 1)
            key = key.removeprefix('--')
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError):
                pass  # a plain string
            config[key] = check(key, value, defaults, f"--{key}")
    return config
