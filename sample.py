"""
Sample text from a checkpoint (trained, upcycled or resumed), nanoGPT's sample.py:

    python sample.py --out_dir=out/RUN --start="ROMEO:" --num_samples=3 --max_new_tokens=200 \
        --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --out_dir=out/RUN --start=FILE:prompt.txt

- The tokenizer is the run's (checkpoint.run_tokenizer: the checkpoint's, else its data set's
  meta.json from data/<dataset>/, as eval.py reads it); --tokenizer gives one where neither names
  it.
- Generation keeps a key/value cache (GPT.generate), so each new token costs one position's
  forward while the text fits in block_size; kv_cache=False is nanoGPT's full forward per token,
  with the same samples (tests/test_sample.py).
- Every setting is checked against its range (LIMITS) before the checkpoint is read: a negative
  temperature, top_k or max_new_tokens, or no samples, is one line; temperature 0 is greedy.
"""
import sys
from pathlib import Path

import torch

import moe
from checkpoint import CKPT, load_model, run_tokenizer
from cli import autocast, errors, parse, pick_device, pick_dtype, settings_of

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run folder holding ckpt.pt
start = "\n"  # the prompt; FILE:path reads it from a file
num_samples = 10  # samples to draw
max_new_tokens = 500  # tokens generated per sample
# 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy (the most likely token)
temperature = 0.8
top_k = 200  # keep only the top_k most likely tokens (0 = all)
seed = 1337
device = 'cpu'  # 'cpu', 'cuda', 'cuda:1', ... ('auto': cuda where there is one)
dtype = 'float32'  # 'float32', 'bfloat16' or 'float16' (autocast), or 'auto'
kv_cache = True  # keep keys and values of the tokens seen (False: nanoGPT's full forward per token)
tokenizer = ''  # tokenizer spec where the run names none: gpt2, char, hf:..., gguf:...
# every forward's routing (each MoE layer's ids and weights) to out_dir/routing_trace_sample.pt
routing_trace = False
# -----------------------------------------------------------------------------
# the allowed values of the settings above (cli.problem)
LIMITS = dict(out_dir='run', start='text', num_samples='>= 1', max_new_tokens='>= 0',
              temperature='>= 0', top_k='>= 0', seed='[0, 4294967296)', device='text',
              dtype='dtype', tokenizer='text')


def main(argv):
    cfg, _ = parse(settings_of(__file__), argv, limits=LIMITS)
    text = cfg['start']
    if text.startswith('FILE:'):
        if not Path(text[5:]).is_file():
            raise ValueError(f"--start={text}: no file {text[5:]}")
        text = Path(text[5:]).read_text(encoding='utf-8')
    device_name = pick_device(cfg['device'])
    device_type = device_name.split(':')[0]
    dtype_name, _ = pick_dtype(cfg['dtype'], device_type)
    model, ckpt = load_model(cfg['out_dir'], device_name)
    model.eval()
    encode, decode, _, _, spec = run_tokenizer(ckpt, cfg['tokenizer'])
    try:
        ids = encode(text)
    except KeyError as e:
        raise ValueError(f"the {spec} tokenizer has no token for {e.args[0]!r}, which the prompt "
                         f"holds: change --start or pass --tokenizer")
    if not ids:
        raise ValueError("the prompt is empty: pass --start")
    torch.manual_seed(cfg['seed'])
    x = torch.tensor(ids, dtype=torch.long, device=device_name)[None]
    trace = [[] for _ in model.moe_layers()] if cfg['routing_trace'] else None
    with autocast(device_type, dtype_name), moe.routing(model, trace=trace):
        for _ in range(cfg['num_samples']):
            y = model.generate(x, cfg['max_new_tokens'], temperature=cfg['temperature'],
                               top_k=cfg['top_k'] or None, kv_cache=cfg['kv_cache'])
            print(decode(y[0].tolist()))
            print('---------------')
    if trace is not None:
        moe.save_trace(Path(cfg['out_dir'], 'routing_trace_sample.pt'), trace)


if __name__ == '__main__':
    with errors('sample.py'):
        main(sys.argv[1:])
