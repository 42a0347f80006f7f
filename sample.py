"""
Sample text from a checkpoint (trained, upcycled or resumed), nanoGPT's sample.py:

    python sample.py --out_dir=out/RUN --start="ROMEO:" --num_samples=3 --max_new_tokens=200 --temperature=0.8 \
        --top_k=200 --seed=1337
    python sample.py --out_dir=out/RUN --start=FILE:prompt.txt

The tokenizer is the checkpoint's (or its data set's meta.json, read from data/<dataset>/ as eval.py does);
--tokenizer gives one where neither names it. Generation keeps a key/value cache (GPT.generate), so each new
token costs one position's forward while the text fits in block_size.
"""
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from configurator import configure
from checkpoint import load_model
from prepare import load_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run folder holding ckpt.pt
start = "\n"  # the prompt; FILE:path reads it from a file
num_samples = 10  # samples to draw
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random
top_k = 200  # keep only the top_k most likely tokens (0 = all)
seed = 1337
device = 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...
dtype = 'float32'  # 'float32', 'bfloat16' or 'float16' (autocast)
kv_cache = True  # keep keys and values of the tokens seen (False: nanoGPT's full forward per token)
tokenizer = ''  # tokenizer spec where the checkpoint names none: gpt2, char, hf:..., gguf:...
# -----------------------------------------------------------------------------


def tokenizer_spec(ckpt, override=None):
    """(tokenizer spec, meta.json of the checkpoint's data set or None): as eval.py's load_run"""
    spec, meta = override or ckpt.get('tokenizer'), None
    dataset = (ckpt.get('config') or {}).get('dataset')
    if dataset and Path('data', dataset, 'meta.json').exists():
        meta = json.loads(Path('data', dataset, 'meta.json').read_text())
        spec = spec or meta['tokenizer']
    return spec, meta


def main(argv):
    defaults = {k: v for k, v in globals().items() if k in SETTINGS}
    cfg = configure(defaults, argv)
    if not Path(cfg['out_dir'], 'ckpt.pt').is_file():
        raise ValueError(f"no checkpoint at {Path(cfg['out_dir'], 'ckpt.pt')}: set --out_dir to a run folder")
    model, ckpt = load_model(cfg['out_dir'], cfg['device'])
    model.eval()
    spec, meta = tokenizer_spec(ckpt, cfg['tokenizer'])
    if not spec:
        raise ValueError("the checkpoint names no tokenizer and its data set's meta.json is not in data/: pass --tokenizer")
    if spec == 'char' and not (meta and meta.get('chars')):
        raise ValueError(f"a character-level checkpoint needs data/{ckpt['config'].get('dataset')}/meta.json "
                         f"(its vocabulary): run from the folder that holds data/")
    encode, decode, _, _ = load_tokenizer(spec, meta and meta.get('chars'))
    text = cfg['start']
    if text.startswith('FILE:'):
        text = Path(text[5:]).read_text(encoding='utf-8')
    try:
        ids = encode(text)
    except KeyError as e:
        raise ValueError(f"the {spec} tokenizer has no token for {e.args[0]!r}, which the prompt holds")
    if not ids:
        raise ValueError("the prompt is empty: pass --start")
    torch.manual_seed(cfg['seed'])
    device_type = cfg['device'].split(':')[0]
    ctx = nullcontext() if cfg['dtype'] == 'float32' else torch.autocast(device_type, getattr(torch, cfg['dtype']))
    x = torch.tensor(ids, dtype=torch.long, device=cfg['device'])[None]
    with ctx:
        for _ in range(cfg['num_samples']):
            y = model.generate(x, cfg['max_new_tokens'], temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                               kv_cache=cfg['kv_cache'])
            print(decode(y[0].tolist()))
            print('---------------')


SETTINGS = ('out_dir', 'start', 'num_samples', 'max_new_tokens', 'temperature', 'top_k', 'seed', 'device', 'dtype',
            'kv_cache', 'tokenizer')

if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"sample.py: error: {' '.join(str(e).split())}")
