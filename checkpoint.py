"""
What a run folder holds and how it is written: the checkpoint, its
tokenizer, files written atomically.

- A run folder is out/NAME/ with ckpt.pt (train.py or upcycle.py), config.json, log.jsonl and
  eval.json. ckpt.pt holds the whole model whatever the expert parallelism it was trained with
  (model_args has ep_size 1).
- Every file is written atomically: a temporary file, fsync, then a rename, so a crash or a full
  disk never leaves half a file and the earlier version stays whole; the temporary file is removed,
  and a full disk is an OSError, not torch.save's RuntimeError (tests/test_faults.py kills and
  fills the disk).
- The checkpoint saved before the current one stays as ckpt.prev.pt (a hard link, no copy): train.py
  init_from=resume falls back to it when ckpt.pt cannot be used, and says so.
- A checkpoint is checked whole when it is read (readable, its weights fit its own model_args,
  finite), so a bad file is one line naming it and the fix, never a traceback from load_state_dict.
- A run's tokenizer: the one its checkpoint names, else its data set's (data/DATASET/meta.json); a
  character-level run needs that meta.json for its vocabulary.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from model import GPT, GPTConfig, knobs, settings
from prepare import load_tokenizer

CKPT, PREVIOUS = 'ckpt.pt', 'ckpt.prev.pt'  # a run folder's checkpoint and the one saved before it
# a sharded checkpoint (train.py save_sharded): a folder of each rank's blocks, and the one before it
SHARDS, PREVIOUS_SHARDS = 'ckpt_shards', 'ckpt_shards.prev'

# -----------------------------------------------------------------------------
# atomic writes


def fsync_dir(path):
    """the renames in a folder survive a power cut"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path, mode='w', before_rename=None):
    """a file object whose contents replace path only when the block ends without an error;
    before_rename: called once the new contents are on disk, just before they take path's place"""
    path = os.fspath(path)
    tmp = path + '.tmp'
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or '.')


def write_json(path, obj):
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)


@contextmanager
def atomic_dir(path):
    """a fresh folder (a Path) that becomes path when the block ends
    without an error; path must not exist"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)

# -----------------------------------------------------------------------------
# checkpoints


def upgrade(model_args):
    """model_args of an older checkpoint in today's names: balance_per_sequence=True is
    balance_scope='sequence'"""
    args = dict(model_args)
    if args.pop('balance_per_sequence', False):
        args['balance_scope'] = 'sequence'
    return args


def save_checkpoint(out_dir, ckpt, previous='keep'):
    """out_dir/ckpt.pt, written atomically. previous: 'keep' = the checkpoint it replaces becomes
    ckpt.prev.pt; 'leave' = ckpt.prev.pt stays as it is (a run that fell back to it); 'drop' = an
    old ckpt.prev.pt is removed (it belongs to another run). OSError (disk full, ...) leaves the old
    files as they were."""
    path, prev = os.path.join(out_dir, CKPT), os.path.join(out_dir, PREVIOUS)

    def move_previous():
        if previous == 'keep' and os.path.exists(path):
            prev_tmp = prev + '.tmp'
            if os.path.exists(prev_tmp):
                os.remove(prev_tmp)
            try:
                os.link(path, prev_tmp)
            except OSError:
                # a file system without hard links
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        elif previous == 'drop' and os.path.exists(prev):
            os.remove(prev)

    with atomic_file(path, 'wb', before_rename=move_previous) as f:
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:
            # torch's zip writer turns a failed write (a full disk) into RuntimeError('unexpected
            # pos ...'): the OSError under it is the problem
            cause = write_error(e)
            if cause is None:
                raise
            raise cause from None


def write_error(e):
    """the OSError that an exception was raised while handling (its __context__ chain), or None"""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def save_run(out_dir, ckpt, previous, first=False, keep_copy=False):
    """train.py's checkpoint: save_checkpoint, then, for a run's first, one line saying what its
    size is made of; keep_copy: also out_dir/iter_N/ckpt.pt, a hard link (no second copy on disk)
    -> the path of ckpt.pt. OSError as save_checkpoint's"""
    save_checkpoint(out_dir, ckpt, previous)
    path = os.path.join(out_dir, CKPT)
    if first:
        opt = ckpt.get('optimizer') or {}
        mb = sum(t.numel() * t.element_size() for s in opt.values() for t in s.values()
                 if torch.is_tensor(t)) / 1e6
        what = (f"of which {mb:,.1f} MB optimizer state, needed only to resume "
                f"(--save_optimizer=False saves the weights only)")
        if 'optimizer' not in ckpt:
            what = "the weights only (save_optimizer=False): it cannot be resumed"
        print(f"checkpoint {path}: {os.path.getsize(path) / 1e6:,.1f} MB, {what}")
    if keep_copy:
        kept = os.path.join(out_dir, f"iter_{ckpt['iter_num']}", CKPT)
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        if os.path.exists(kept):
            os.remove(kept)
        os.link(path, kept)
    return path


def read_checkpoint(path, device='cpu'):
    """a checkpoint file, checked whole: readable, train.py's layout, weights that fit its own
    model_args and are finite; else ValueError saying what is wrong with it (one line). model_args
    come back in today's names."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        # a truncated zip, a bad pickle, random bytes: all the same to the reader
        raise ValueError(f"{path} cannot be read, it is truncated or corrupted "
                         f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
    return checked(ckpt, path)


def checked(ckpt, path):
    """ckpt, a checkpoint read from path, if it is whole (see read_checkpoint), else ValueError"""
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict)
            and isinstance(ckpt.get('model_args'), dict)):
        raise ValueError(f"{path} is not a checkpoint of train.py or upcycle.py "
                         f"(no model and model_args)")
    ckpt['model_args'] = upgrade(ckpt['model_args'])
    try:
        # the model's shapes without memory or time
        with torch.device('meta'):
            expected = GPT(GPTConfig(**ckpt['model_args'])).state_dict()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} holds a model this version of model.py cannot build "
                         f"({str(e).splitlines()[0]})")
    got = ckpt['model']
    wrong = sorted(expected.keys() ^ got.keys())
    wrong += sorted(k for k in expected.keys() & got.keys() if expected[k].shape != got[k].shape)
    if wrong:
        raise ValueError(f"{path} holds weights of another architecture than its model_args say "
                         f"({len(wrong)} names or shapes differ, e.g. {wrong[0]})")
    bad = next((k for k, v in got.items()
                if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:
        raise ValueError(f"{path} holds non-finite weights ({bad} has NaN or inf)")
    return ckpt


def load_checkpoint(ckpt_dir, device='cpu', fallback=False):
    """(checkpoint, path, note) of ckpt_dir/ckpt.pt, checked by read_checkpoint, or of its sharded
    checkpoint ckpt_dir/ckpt_shards/ where that is newer. When it cannot be used: with fallback, the
    previous checkpoint (ckpt.prev.pt, ckpt_shards.prev/), and note (a warning line) says so; else
    ValueError, one line naming the file and the fix."""
    path, prev = os.path.join(ckpt_dir, CKPT), os.path.join(ckpt_dir, PREVIOUS)
    read = read_checkpoint
    if newer(os.path.join(ckpt_dir, SHARDS, META), path):
        path, prev = os.path.join(ckpt_dir, SHARDS), os.path.join(ckpt_dir, PREVIOUS_SHARDS)
        read = read_shards
    try:
        return read(path, device), path, None
    except ValueError as e:
        problem = e
    if not os.path.exists(prev):
        if not os.path.exists(path):
            fix = "train one with train.py or make one with upcycle.py"
        else:
            fix = "train again, or use another checkpoint folder"
        raise ValueError(f"{problem}: {fix}")
    if not fallback:
        raise ValueError(f"{problem}: the previous checkpoint is {prev}; to use it, copy it over "
                         f"{CKPT} (train.py init_from=resume falls back to it by itself)")
    try:
        ckpt = read(prev, device)
    except ValueError as e:
        raise ValueError(f"{problem}, and the previous checkpoint too: {e}: train again")
    return ckpt, prev, (f"warning: {problem}; falling back to the previous checkpoint {prev} "
                        f"(iteration {ckpt.get('iter_num', '?')})")


# -----------------------------------------------------------------------------
# sharded checkpoints: each rank's block of every tensor, without a gather (fsdp.py)

META = 'meta.pt'  # a sharded checkpoint's everything but the tensors' blocks (rank 0 writes it)


def newer(path, than):
    """path exists and is newer than `than` (or `than` does not exist)"""
    return os.path.exists(path) and (not os.path.exists(than)
                                     or os.path.getmtime(path) >= os.path.getmtime(than))


def save_shards(out_dir, ckpt, rank, barrier):
    """out_dir/ckpt_shards/: every rank's rank{r}.pt (ckpt's model and optimizer entries of this
    rank: fsdp.shard_entry's blocks, or None) and rank 0's meta.pt (the rest of ckpt), written in a
    temporary folder that then takes the place of the last one, which becomes ckpt_shards.prev/.
    barrier: torch.distributed's, so that no rank reads a folder before it is whole. Every rank
    calls it -> the path of the folder"""
    final = os.path.join(out_dir, SHARDS)
    tmp, prev = final + '.tmp', os.path.join(out_dir, PREVIOUS_SHARDS)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()

    def drop(entries):
        # the tensors another rank writes
        return {n: e for n, e in entries.items() if e is not None}

    mine = dict(model=drop(ckpt['model']))
    if 'optimizer' in ckpt:
        mine['optimizer'] = {n: drop(s) for n, s in ckpt['optimizer'].items()}
    with atomic_file(os.path.join(tmp, f'rank{rank}.pt'), 'wb') as f:
        torch.save(mine, f)
    barrier()
    if rank == 0:
        meta = {k: v for k, v in ckpt.items() if k not in ('model', 'optimizer')}
        meta['with_optimizer'] = 'optimizer' in ckpt
        with atomic_file(os.path.join(tmp, META), 'wb') as f:
            torch.save(meta, f)
        if os.path.exists(final):
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(final, prev)
        os.replace(tmp, final)
        fsync_dir(out_dir)
    barrier()
    return final


def assemble(pieces, where):
    """the whole tensor from its ranks' entries (dicts of index, shape, t: fsdp.shard_entry)"""
    shape = pieces[0]['shape']
    if not shape:
        # a 0-d tensor (an optimizer's step): whole on rank 0
        return pieces[0]['t']
    whole = torch.empty(shape, dtype=pieces[0]['t'].dtype)
    filled = 0
    for e in pieces:
        whole[tuple(slice(a, b) for a, b in e['index'])] = e['t']
        filled += e['t'].numel()
    if filled != whole.numel():
        raise ValueError(f"{where}: {whole.numel() - filled} of its {whole.numel()} values are "
                         f"missing")
    return whole


def read_shards(folder, device='cpu'):
    """a sharded checkpoint folder as the checkpoint ckpt.pt would hold (whole tensors), checked
    as read_checkpoint checks one; the rank files are memory-mapped, so a tensor's blocks are read
    when it is assembled"""
    try:
        meta = torch.load(os.path.join(folder, META), map_location=device, weights_only=True)
        ranks = [torch.load(os.path.join(folder, f'rank{r}.pt'), map_location=device,
                            weights_only=True, mmap=True)
                 for r in range(len(meta['rng']))]
    except Exception as e:
        raise ValueError(f"{folder} cannot be read, a rank's file is missing, truncated or "
                         f"corrupted ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
    model, optimizer = {}, {}
    for r in ranks:
        for n, e in r['model'].items():
            model.setdefault(n, []).append(e)
        for n, s in r.get('optimizer', {}).items():
            for k, e in s.items():
                optimizer.setdefault(n, {}).setdefault(k, []).append(e)
    ckpt = {k: v for k, v in meta.items() if k != 'with_optimizer'}
    ckpt['model'] = {n: assemble(p, f"{folder} {n}") for n, p in model.items()}
    if meta['with_optimizer']:
        ckpt['optimizer'] = {n: {k: assemble(p, f"{folder} {n} {k}") for k, p in s.items()}
                             for n, s in optimizer.items()}
    return checked(ckpt, folder)


def load_model(out_dir, device='cpu'):
    """the model of a run folder -> (model, checkpoint); ValueError (one line: the file and the fix)
    when it cannot be loaded"""
    ckpt = load_checkpoint(out_dir, device)[0]
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.to(device), ckpt

# -----------------------------------------------------------------------------
# a run's tokenizer


def tokenizer_spec(ckpt, override=None):
    """(tokenizer spec or None, meta.json of the run's data set or None): override, else the
    checkpoint's, else its data set's (data/DATASET/meta.json, read from the current folder)"""
    spec, meta = override or ckpt.get('tokenizer'), None
    dataset = (ckpt.get('config') or {}).get('dataset')
    if dataset and Path('data', dataset, 'meta.json').exists():
        meta = json.loads(Path('data', dataset, 'meta.json').read_text())
        spec = spec or meta['tokenizer']
    return spec, meta


def run_tokenizer(ckpt, override=None):
    """(encode, decode, vocab_size, eot, spec) of a run; ValueError (one line, with the fix) when it
    has none or it cannot be loaded. eot: the end-of-text token (the newline stands in at character
    level)"""
    spec, meta = tokenizer_spec(ckpt, override)
    dataset = (ckpt.get('config') or {}).get('dataset')
    if not spec:
        raise ValueError(f"the checkpoint names no tokenizer and data/{dataset}/meta.json "
                         f"is missing: pass --tokenizer")
    chars = meta.get('chars') if meta else None
    if spec == 'char' and not chars:
        raise ValueError(f"a character-level checkpoint needs data/{dataset}/meta.json "
                         f"(its vocabulary): run from the folder that holds data/")
    try:
        encode, decode, vocab_size, eot = load_tokenizer(spec, chars)
    except Exception as e:
        hint = ('; offline, set TIKTOKEN_CACHE_DIR=../shared/data/gpt2/tiktoken_cache'
                if spec == 'gpt2' else '')
        first = (str(e).splitlines() or [''])[0]
        raise ValueError(f"could not load tokenizer {spec!r} "
                         f"({type(e).__name__}: {first}){hint}") from e
    eot = encode('\n')[0] if eot is None else eot
    return encode, decode, vocab_size, eot, spec

# -----------------------------------------------------------------------------
# a run continued from a checkpoint (train.py init_from), and its log


def contradictions(old, asked):
    """the keys of asked (architecture key -> value) whose value differs from the checkpoint's
    model_args old, with 0s resolved as GPTConfig resolves them (mlp_hidden=0 is 4 * n_embd, ...)"""
    opts = {k: v for k, v in asked.items() if k in old['router_options']}
    new = {**old, **{k: v for k, v in asked.items() if k in old},
           'router_options': {**old['router_options'], **opts}}
    try:
        new = asdict(GPTConfig(**new))
    except ValueError:
        # compared as given
        pass
    new, old = {**new, **new['router_options']}, {**old, **old['router_options']}
    return [k for k in asked if new.get(k) != old.get(k)]


def resume(config, given, machine):
    """(config, checkpoint, its path, model_args, note) of a run with init_from != 'scratch'; given:
    the settings the command line set (key -> where); machine: the settings a checkpoint never sets.
    On resume each setting not given, but the machine's, is the checkpoint's. The architecture is
    the checkpoint's: a contradicting setting is a ValueError, a given training knob wins,
    block_size is at most the model's. The config returned records what runs; note: a fallback
    warning or None."""
    is_resume = config['init_from'] == 'resume'
    folder = config['out_dir'] if is_resume else config['init_from']
    ckpt, path, note = load_checkpoint(folder, fallback=is_resume)
    if is_resume and 'optimizer' not in ckpt:
        raise ValueError(f"{path} holds the weights only (no optimizer state) "
                         f"and cannot be resumed: "
                         f"start a new run from it with --init_from={os.path.dirname(path)} "
                         f"--out_dir=<another folder>")
    if is_resume:
        config = {**config, **{k: v for k, v in (ckpt.get('config') or {}).items()
                               if k in config and k not in given and k not in machine}}
    old = ckpt['model_args']
    old_all = {**old, **old['router_options']}
    # the run's own: block_size (at most the model's) and the system settings; the knobs may change
    own = {'block_size', *settings('system')}
    asked = {k: config[k] for k in given if k in old_all and k not in own and k not in knobs()}
    bad = contradictions(old, asked)
    if bad:
        raise ValueError(f"{path} holds a model with "
                         + ', '.join(f"{k}={old_all.get(k)!r}" for k in bad)
                         + "; the config asks for "
                         + ', '.join(f"{k}={config[k]!r} ({given[k]})" for k in bad)
                         + ": the architecture comes from the checkpoint, drop these settings "
                         + "(or train from scratch)")
    model_args = {**old, 'router_options': dict(old['router_options'])}
    # a knob given wins (also where the checkpoint predates it), else the checkpoint's
    for k in knobs():
        if k in given:
            where = model_args if k in settings() else model_args['router_options']
            where[k] = config[k]
    if config['block_size'] > old['block_size'] and 'block_size' in given:
        raise ValueError(f"block_size={config['block_size']} ({given['block_size']}) "
                         f"is longer than the "
                         f"{old['block_size']} positions of the model in {path}: "
                         f"use at most {old['block_size']}")
    config['block_size'] = min(config['block_size'], old['block_size'])
    runs = {**model_args, **model_args['router_options']}
    config.update({k: v for k, v in runs.items() if k in config and k not in own})
    return config, ckpt, path, model_args, note


def open_log(out_dir, resume_iter=None, again=False):
    """out_dir/log.jsonl to append to. A resumed run (resume_iter: its first iteration) keeps the
    rows before its checkpoint (the stopped run may have logged beyond it), and the checkpoint's own
    unless it evaluates it `again`; another run starts a new file, saying so when it replaces one"""
    path = os.path.join(out_dir, 'log.jsonl')
    if resume_iter is None:
        if os.path.exists(path) or os.path.exists(os.path.join(out_dir, CKPT)):
            print(f"note: {out_dir} holds an earlier run: "
                  f"this one starts a new log.jsonl and replaces "
                  f"its ckpt.pt at its first checkpoint "
                  f"(--init_from=resume continues the earlier run instead)")
        return open(path, 'w')
    kept = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            row = json.loads(line)
        except ValueError:
            # a line cut short when the run was killed
            continue
        redone = row['iter'] == resume_iter and 'val_loss' in row and again
        if row['iter'] < resume_iter or (row['iter'] == resume_iter and not redone):
            kept.append(line if line.endswith('\n') else line + '\n')
    with atomic_file(path) as f:
        f.writelines(kept)
    return open(path, 'a')


if __name__ == '__main__':
    # python checkpoint.py OUT_DIR: a sharded checkpoint (OUT_DIR/ckpt_shards/) -> OUT_DIR/ckpt.pt
    import sys
    if len(sys.argv) != 2 or not os.path.isdir(os.path.join(sys.argv[1], SHARDS)):
        sys.exit(f"usage: python checkpoint.py OUT_DIR, where OUT_DIR/{SHARDS}/ is a sharded "
                 f"checkpoint of train.py --save_sharded=True")
    try:
        ckpt = read_shards(os.path.join(sys.argv[1], SHARDS))
        save_checkpoint(sys.argv[1], ckpt)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"{os.path.join(sys.argv[1], CKPT)}: iter {ckpt['iter_num']}, the whole model "
          f"({len(ckpt['model'])} tensors) from {len(ckpt['rng'])} ranks' shards")
