"""
Zero-shot tasks through lm-eval, perplexity, and routing analysis of our checkpoints.

    python eval.py out/RUN --tasks piqa,arc_easy                        # lm-eval's tasks, data from the hub
    python eval.py out/RUN --tasks all --data_dir ../shared/data/tasks --limit 200   # the same tasks, offline
    python eval.py out/A out/B --tasks piqa,hellaswag --data_dir ../shared/data/tasks --analyze
    python eval.py out/r/ckpt_1000 out/r/ckpt_2000 out/r --checkpoints --tasks piqa --data_dir ../shared/data/tasks
    python eval.py out/RUN --ppl data/gutenberg_gpt2 --ppl notes.txt [--stride 256]
    python eval.py --compare out/A out/B                                # one markdown table of their eval.json
    python eval.py --plot out/A out/B     # training curves, expert load over training (log.jsonl), eval heatmaps

Zero-shot: MoELM is an lm-eval LM over our GPT, scored like lm-eval's `hf` model (requests sorted by length,
right-padded, one forward per batch, log-softmax in float32, context + continuation left-truncated to
block_size), run through lm_eval.simple_evaluate one task at a time. With --data_dir a task is lm-eval's own
YAML (prompts, targets, metrics, split) with only the dataset swapped: the local file, converted to the record
layout of the Hugging Face dataset that the YAML names; the document counts are the official ones.
HellaSwag's local file is derived text (../shared/data/README.md): "activity_label: ctx" with ctx = ctx_a + " "
+ ctx_b. lm-eval capitalises ctx_b, so ctx_b is taken back as the unfinished sentence at the end (right on the
10 items checked against the original; 7 of the 3,243 ActivityNet items end in a number or quote and stay
ambiguous). lm-eval's process_docs then runs as on the hub data: its preprocess leaves 60,238 of the 60,252
lines unchanged and, on the other 14, removes [bracketed] text that the derived file kept, as on the original.

Perplexity (--ppl): a prepared data folder's val.bin (meta.json gives val_bytes) or a UTF-8 text file, in windows
of block_size tokens starting every --stride (<= block_size) tokens (default: no overlap); each window scores the
tokens that no earlier window scored. bpb = loss / ln 2 * tokens / bytes.

Routing analysis (--analyze), from the same forward passes, padding left out, per task and MoE layer: expert
load, its CV and entropy, mean entropy of the top-k weights, router margin w1 - w2, dropped fraction (from the
layers' counters, which include padded positions); Drop-Top-1 (every MoE layer drops each token's first
choice: score change per task); a heatmap of the load (PNG, needs matplotlib). --checkpoints: the runs are
checkpoints of one run, oldest first, the last one final: change rate of the selection between consecutive
checkpoints (slot-wise on the sorted top-k ids, as LibMoE) and saturation (agreement with the final one).

Each run gets <run>/eval.json (every number and the command, written atomically); tables are printed.
"""
import argparse
import bz2
import json
import logging
import math
import os
import re
import shlex
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import datasets
import lm_eval
import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from checkpoint import load_model
from cli import auto_dtype
from moe import expert_load, load_stats, weight_sums
from prepare import check_data, load_meta, load_tokenizer

# -----------------------------------------------------------------------------
# local task files -> records laid out as the Hugging Face datasets that lm-eval's YAMLs name

def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def piqa_docs(d):  # baber/piqa
    labels = Path(d, 'piqa/valid-labels.lst').read_text().split()
    return [dict(goal=r['goal'], sol1=r['sol1'], sol2=r['sol2'], label=int(y))
            for r, y in zip(read_jsonl(Path(d, 'piqa/valid.jsonl')), labels, strict=True)]


def arc_docs(d, name):  # allenai/ai2_arc: the folder holds the HF export (id, question, choices, answerKey)
    return read_jsonl(Path(d, name, 'hf_format/test.jsonl'))


def winogrande_docs(d):  # allenai/winogrande, winogrande_xl
    return [{k: r[k] for k in ('sentence', 'option1', 'option2', 'answer')}  # the file also has qID
            for r in read_jsonl(Path(d, 'winogrande/dev.jsonl'))]


def lambada_docs(d):  # EleutherAI/lambada_openai
    return [dict(text=r['text']) for r in read_jsonl(Path(d, 'lambada_openai/lambada_test.jsonl'))]


def boolq_docs(d):  # aps/super_glue boolq: label 0 = false, 1 = true
    return [{**r, 'label': int(str(r['label']).lower() == 'true')} for r in read_jsonl(Path(d, 'boolq/val.jsonl'))]


def copa_docs(d):  # aps/super_glue copa
    return read_jsonl(Path(d, 'copa/val.jsonl'))  # premise, choice1, choice2, question, label, idx


def openbookqa_docs(d):  # allenai/openbookqa, main; the original TSV has choices as "(A) text (B) text ..."
    docs = []
    for line in Path(d, 'openbookqa/test.tsv').read_text(encoding='utf-8').splitlines()[1:]:
        qid, stem, choices, _, key = line.split('\t')
        parts = re.split(r'\s*\(([A-D])\)\s*', choices)[1:]  # [label, text, label, text, ...]
        docs.append(dict(id=qid, question_stem=stem, choices=dict(text=parts[1::2], label=parts[0::2]), answerKey=key))
    return docs


def hellaswag_docs(d):  # Rowan/hellaswag fields from 6 lines per item: "activity_label: ctx", gold, 4 endings
    with bz2.open(Path(d, 'hellaswag/hellaswag_val_full.txt.bz2'), 'rt', encoding='utf-8') as f:
        lines = f.read().split('\n')
    docs = []
    for i in range(0, len(lines) - 5, 6):
        activity_label, ctx = lines[i].split(': ', 1)
        m = re.fullmatch(r'(.*[.!?]) ([^.!?]+)', ctx)  # ctx_b: the unfinished sentence at the end (ActivityNet items)
        ctx_a, ctx_b = m.groups() if m else (ctx, '')
        docs.append(dict(activity_label=activity_label, ctx_a=ctx_a, ctx_b=ctx_b, ctx=ctx, endings=lines[i + 2:i + 6],
                         label=lines[i + 1]))
    return docs


LOCAL_TASKS = {  # name: (lm-eval's YAML under lm_eval/tasks, the split it scores, loader, official document count)
    'piqa': ('piqa/piqa.yaml', 'validation', piqa_docs, 1838),
    'arc_easy': ('arc/arc_easy.yaml', 'test', partial(arc_docs, name='arc_easy'), 2376),
    'arc_challenge': ('arc/arc_challenge.yaml', 'test', partial(arc_docs, name='arc_challenge'), 1172),
    'winogrande': ('winogrande/default.yaml', 'validation', winogrande_docs, 1267),
    'lambada_openai': ('lambada/lambada_openai.yaml', 'test', lambada_docs, 5153),
    'boolq': ('super_glue/boolq/default.yaml', 'validation', boolq_docs, 3270),
    'openbookqa': ('openbookqa/openbookqa.yaml', 'test', openbookqa_docs, 500),
    'copa': ('super_glue/copa/default.yaml', 'validation', copa_docs, 100),
    'hellaswag': ('hellaswag/hellaswag.yaml', 'validation', hellaswag_docs, 10042),
}


# lm-eval's notice for datasets built by a function, about its --metadata option, does not apply here
logging.getLogger('lm_eval.api.task').addFilter(lambda record: 'Custom kwargs' not in record.getMessage())


def local_dataset(loader, split, data_dir, **_):
    return datasets.DatasetDict({split: datasets.Dataset.from_list(loader(data_dir))})


def local_task_config(name, data_dir):
    """lm-eval's config of a task (its YAML, functions resolved) with the local file as the dataset"""
    yaml, split, loader, _ = LOCAL_TASKS[name]
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / yaml, resolve_func=True)
    cfg.pop('tag', None)
    splits = dict(training_split=None, validation_split=None, test_split=None)  # zero-shot: only the scored split
    splits['test_split' if split == 'test' else 'validation_split'] = split
    return {**cfg, **splits, 'dataset_path': str(Path(data_dir, name)), 'dataset_name': None,
            'custom_dataset': partial(local_dataset, loader, split, data_dir)}


def task_specs(names, data_dir=None):
    """{name: what simple_evaluate takes}: the name (lm-eval loads the hub data) or the local config"""
    if data_dir is None:
        return {n: n for n in names}
    if not Path(data_dir).is_dir():
        raise ValueError(f"--data_dir {data_dir} is not a folder; point it at the task folders (../shared/data/tasks)")
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"no local task {', '.join(unknown)}; with --data_dir choose from {', '.join(LOCAL_TASKS)}")
    return {n: local_task_config(n, data_dir) for n in names}

# -----------------------------------------------------------------------------
# our model as an lm-eval LM

class MoELM(TemplateLM):
    def __init__(self, model, tokenizer, batch_size=16, device='cpu', dtype='float32'):
        """tokenizer: (encode, decode, vocab_size, eot_token), as prepare.load_tokenizer returns it"""
        super().__init__()
        self.model, self._device = model.eval(), device
        self.encode, self.decode, _, self.eot = tokenizer
        self.batch_size, self.max_length = batch_size, model.config.block_size
        device_type = device.split(':')[0]
        self.autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, getattr(torch, dtype))
        self.task = None  # the task being scored: routings are kept under its name
        self.routing = None  # {task: [per MoE layer: [(ids, weights) of the real tokens, per forward]]} when recording

    @property
    def eot_token_id(self):
        return self.eot

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        try:
            return self.encode(string)
        except KeyError as e:  # a character-level vocabulary that lacks a character of the task
            raise ValueError(f"the tokenizer has no token for {e.args[0]!r}, which the task's text holds") from e

    def logits(self, rows, spans, record=True):
        """token lists, right-padded, in one forward -> for each row the float32 logits (end - start, V) of its span
        (start, end) only, on the host (never the whole (B, S, V)); keeps the routings of the real tokens"""
        lengths = torch.tensor([len(r) for r in rows])
        x = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        record, layers = record and self.routing is not None, self.model.moe_layers()
        for m in layers:
            m.record = [] if record else None
        with torch.no_grad(), self.autocast:
            logits = self.model(x.to(self._device))[0]
        if record:
            real = (torch.arange(x.shape[1])[None] < lengths[:, None]).view(-1)  # (B*S,) not padding
            for m, kept in zip(layers, self.routing.setdefault(self.task, [[] for _ in layers])):
                ids, w = m.record.pop()
                kept.append((ids[real], w[real]))
                m.record = None
        return [logits[b, s:e].float().cpu() for b, (s, e) in enumerate(spans)]  # whole vocabulary, as lm-eval's hf

    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        """[((context, continuation), context ids, continuation ids)] -> [(log p(continuation), is greedy)]"""
        longest = max((len(continuation) for _, _, continuation in requests), default=0)
        if longest > self.max_length:  # lm-eval's hf asserts the same
            raise ValueError(f"a continuation of {longest} tokens is longer than block_size={self.max_length}")
        whole = [context + continuation for _, context, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: (-len(whole[i]), tuple(whole[i])))  # longest first, as hf
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"loglikelihood {self.task or ''}")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = [whole[i][-(self.max_length + 1):][:-1] for i in batch]  # left-truncated as lm-eval's hf
            spans = [(len(r) - len(requests[i][2]), len(r)) for r, i in zip(rows, batch)]  # the continuation's positions
            logits = self.logits(rows, spans)
            for b, i in enumerate(batch):
                cont = torch.tensor(requests[i][2])
                lp = F.log_softmax(logits[b], dim=-1)  # (len(cont), V)
                results[i] = (lp.gather(1, cont[:, None]).sum().item(), bool((lp.argmax(-1) == cont).all()))
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owner = [], []
        for i, req in enumerate(requests):
            for w in get_rolling_token_windows(self.encode(req.args[0]), self.prefix_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(w)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """greedy, one request at a time, until a stop string, eot or max_gen_toks"""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc='generate_until'):
            context, kwargs = req.args
            until = [kwargs['until']] if isinstance(kwargs.get('until'), str) else kwargs.get('until') or []
            ids, new = self.encode(context), []
            while len(new) < kwargs.get('max_gen_toks', 256) and not any(u in self.decode(new) for u in until):
                row = (ids + new)[-self.max_length:]
                new.append(int(self.logits([row], [(len(row) - 1, len(row))], record=False)[0][-1].argmax()))
                if new[-1] == self.eot:
                    new.pop()
                    break
            out.append(re.split('|'.join(map(re.escape, until)), self.decode(new))[0] if until else self.decode(new))
        return out

# -----------------------------------------------------------------------------
# a run's model and tokenizer, zero-shot scores, perplexity

def first_line(e):
    return (str(e).splitlines() or [''])[0]


def load_run(run_dir, device, tokenizer=None):
    """(model, checkpoint, (encode, decode, vocab_size, eot), tokenizer spec) of a run folder"""
    model, ckpt = load_model(run_dir, device)
    spec, meta = tokenizer or ckpt.get('tokenizer'), None
    dataset = (ckpt.get('config') or {}).get('dataset')
    if dataset and Path('data', dataset, 'meta.json').exists():  # a trained run: its data set's tokenizer
        meta = load_meta(Path('data', dataset))
        spec = spec or meta['tokenizer']
    if not spec:
        raise ValueError(f"{run_dir}: the checkpoint names no tokenizer and data/{dataset}/meta.json is missing; "
                         f"pass --tokenizer")
    try:
        encode, decode, vocab_size, eot = load_tokenizer(spec, meta.get('chars') if meta else None)
    except Exception as e:
        hint = '; offline, set TIKTOKEN_CACHE_DIR=../shared/data/gpt2/tiktoken_cache' if spec == 'gpt2' else ''
        raise ValueError(f"could not load tokenizer {spec!r} ({type(e).__name__}: {first_line(e)}){hint}") from e
    eot = encode('\n')[0] if eot is None else eot  # char level has no end-of-text token: the newline stands in
    return model, ckpt, (encode, decode, vocab_size, eot), spec


def zero_shot(lm, name, spec, task_manager, limit):
    """{metric: value} of one task (acc, acc_stderr, acc_norm, ...; n = documents scored)"""
    lm.task = name
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=[spec], task_manager=task_manager, limit=limit,
                                      bootstrap_iters=1000, log_samples=False)
    except OSError as e:  # ConnectionError included
        if not isinstance(spec, str):
            raise
        raise ValueError(f"could not load task {name} from the hub ({type(e).__name__}: {first_line(e)}); "
                         f"offline, pass --data_dir ../shared/data/tasks") from e
    scores = {k.split(',')[0]: v for k, v in res['results'][name].items() if ',' in k and isinstance(v, (int, float))}
    return {**scores, 'n': res['n-samples'][name]['effective']}


def ppl_tokens(source, spec, encode):
    """(tokens, UTF-8 bytes of their text) of a prepared data folder's val.bin or of a text file"""
    if Path(source).is_dir():
        meta = load_meta(source)
        if meta['tokenizer'] != spec:
            raise ValueError(f"{source} was tokenized with {meta['tokenizer']} but the model uses {spec}: "
                             f"prepare it with the model's tokenizer")
        return np.memmap(Path(source, 'val.bin'), dtype=meta['dtype'], mode='r'), meta['val_bytes']
    with open(source, encoding='utf-8', newline='') as f:  # as prepare.py: CRLF stays CRLF
        text = f.read()
    try:
        return np.array(encode(text), dtype=np.int64), len(text.encode('utf-8'))
    except KeyError as e:  # a character-level vocabulary
        raise ValueError(f"the tokenizer {spec} has no token for {e.args[0]!r}, which {source} holds") from e


def perplexity(lm, tokens, n_bytes, stride=None, max_windows=None):
    """loss (nats per token), ppl and bits per byte, in windows of block_size tokens every `stride` tokens; with
    max_windows, only that many of the windows, evenly spaced over the source (a sample: bits per byte then takes
    the whole source's tokens per byte)"""
    T, N = lm.max_length, len(tokens)
    stride, windows, scored = min(stride or T, T), [], 0  # windows: (start, end, number of new targets at its end)
    for begin in range(0, N - 1, stride):
        end = min(begin + T, N - 1)
        windows.append((begin, end, end - scored))
        scored = end
        if end == N - 1:
            break
    if max_windows and max_windows < len(windows):
        windows = [windows[i * len(windows) // max_windows] for i in range(max_windows)]
    nll = 0.0
    for i in tqdm(range(0, len(windows), lm.batch_size), desc=f"perplexity {lm.task or ''}"):
        batch = windows[i:i + lm.batch_size]
        spans = [(e - b - n, e - b) for b, e, n in batch]  # the n new targets at the end of each window
        for row, (b, e, n) in zip(lm.logits([tokens[b:e] for b, e, _ in batch], spans), batch):
            targets = torch.as_tensor(np.asarray(tokens[e - n + 1:e + 1], dtype=np.int64))  # of positions e-n .. e-1
            nll -= F.log_softmax(row, dim=-1).gather(1, targets[:, None]).sum().item()
    targets = sum(n for _, _, n in windows)  # N - 1 unless sampled
    loss = nll / targets
    bpb = loss / math.log(2) * N / n_bytes
    return dict(loss=loss, ppl=math.exp(loss), bpb=bpb, tokens=N, bytes=n_bytes, stride=stride, scored=targets)

# -----------------------------------------------------------------------------
# routing analysis

def routing_metrics(ids, weights, n_experts):
    """one layer's routings of N tokens, ids and weights (N, K; K slots, UNUSED ones -1 with weight 0, as moe.Routing)
    -> load per expert, its CV and entropy, the mean number of FFN experts per token, and, as moe.py (moe.weight_sums:
    defined for signed weights, tcmoe's, too), the mean entropy of the slots' weights (q = |w| / sum |w|), the mean
    router margin |w|_(1) - |w|_(2) (w1 - w2 for weights >= 0; |w|_(1) when K = 1) and the share of the used slots
    with a negative weight (a subtracted expert)"""
    load = expert_load(ids, n_experts).float()  # ids >= E (cheap experts) and UNUSED slots are not counted
    entropy, margin, negative = weight_sums(weights)
    return dict(**load_stats(load), experts_per_token=(load.sum() / len(ids)).item(),
                weight_entropy=(entropy / len(ids)).item(), margin=(margin / len(ids)).item(),
                negative=(negative / (ids >= 0).sum().clamp_min(1)).item())


def change_rate(ids_a, ids_b):
    """share of top-k slots whose expert differs, slot by slot on the sorted ids (N, k) of the same tokens"""
    if ids_a.shape != ids_b.shape:
        raise ValueError("the checkpoints routed different eval tokens: they need the same tokenizer, tasks and limit")
    return (ids_a.sort(-1).values != ids_b.sort(-1).values).float().mean().item()


def over_checkpoints(sels):
    """sels: per checkpoint {task: [per layer ids (N, k)]} -> change rate between consecutive checkpoints and
    saturation (1 - change rate against the final checkpoint), per task and layer"""
    def rates(s0, s1, t):  # per layer
        return [change_rate(a, b) for a, b in zip(s0[t], s1[t])]
    return dict(change_rate={t: [rates(s0, s1, t) for s0, s1 in zip(sels, sels[1:])] for t in sels[-1]},
                saturation={t: [[1 - r for r in rates(s, sels[-1], t)] for s in sels] for t in sels[-1]})


def save_heatmap(path, loads, title):
    """PNG of each expert's share of the assignments (columns) in each MoE layer (rows)"""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"heatmap {path} skipped: matplotlib is not installed (pip install matplotlib)")
        return
    share = np.array(loads) / np.maximum(np.array(loads).sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(2 + 0.4 * share.shape[1], 1.5 + 0.4 * share.shape[0]))
    fig.colorbar(ax.imshow(share, cmap='viridis', aspect='auto'), ax=ax, label='share of assignments')
    ax.set(xlabel='expert', ylabel='MoE layer', title=title, xticks=range(share.shape[1]), yticks=range(share.shape[0]))
    fig.savefig(path, dpi=120, bbox_inches='tight', metadata={'Title': title})
    plt.close(fig)

# -----------------------------------------------------------------------------
# plots (--plot): training curves of one or several runs, each layer's expert load over training, eval heatmaps

def training_log(run):
    """(train rows, eval rows) of run/log.jsonl; skipped steps (a non-finite loss, logged as text) left out"""
    path = Path(run, 'log.jsonl')
    if not path.is_file():
        raise ValueError(f"no {path}: --plot draws the log that train.py writes into its out_dir")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return ([r for r in rows if isinstance(r.get('loss'), float) and not r.get('skipped')],
            [r for r in rows if 'val_loss' in r])


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_training(runs, path):
    """one figure, one colour per run: train and val loss, balance (aux) loss, z-loss, load CV of each MoE layer"""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for run, color in zip(runs, plt.rcParams['axes.prop_cycle'].by_key()['color'] * len(runs)):
        train, evals = training_log(run)
        name = Path(run).name
        it = [r['iter'] for r in train]
        axes[0].plot(it, [r['loss'] for r in train], color=color, alpha=0.6, label=f"{name} train")
        axes[0].plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o--', color=color, label=f"{name} val")
        for ax, key in ((axes[1], 'aux_loss'), (axes[2], 'z_loss')):
            ax.plot(it, [r.get(key, float('nan')) for r in train], color=color, label=name)
        cvs = np.array([r.get('layer_load_cv', []) for r in train if r.get('layer_load_cv')])  # (logs, layers)
        kept = [r['iter'] for r in train if r.get('layer_load_cv')]
        for j in range(cvs.shape[1] if cvs.ndim == 2 else 0):
            axes[3].plot(kept, cvs[:, j], color=color, alpha=0.4 + 0.6 * (j + 1) / cvs.shape[1],
                         linestyle=['-', '--', ':', '-.'][j % 4], label=f"{name} layer {j}")
    titles = ('loss (line: train, dots: val)', 'balance loss (1 = balanced)', 'router z-loss', 'load CV per MoE layer')
    for ax, title in zip(axes, titles):
        ax.set(xlabel='iteration', title=title)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def plot_load_over_training(run, path):
    """each MoE layer's expert load over training: a heatmap of the share of assignments (iteration x expert)"""
    train, _ = training_log(run)
    rows = [r for r in train if r.get('layer_load')]
    if not rows:
        return False
    load = np.array([r['layer_load'] for r in rows], dtype=float)  # (logs, layers, experts)
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    it, (n_logs, L, E) = [r['iter'] for r in rows], share.shape
    plt = pyplot()
    fig, axes = plt.subplots(L, 1, figsize=(10, 0.6 + (1.0 + 0.18 * E) * L), squeeze=False, sharex=True)
    step = (it[-1] - it[0]) / max(n_logs - 1, 1) if n_logs > 1 else 1
    for j, ax in enumerate(axes[:, 0]):
        im = ax.imshow(share[:, j].T, aspect='auto', cmap='viridis', vmin=0, vmax=max(share.max(), 1e-9),
                       extent=(it[0] - step / 2, it[-1] + step / 2, E - 0.5, -0.5), interpolation='nearest')
        ax.set(ylabel=f"layer {j}\nexpert", yticks=range(E))
    axes[-1, 0].set_xlabel('iteration')
    axes[0, 0].set_title(f"expert load over training: {run} (share of each layer's assignments; 1/{E} = balanced)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label='share of assignments')
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return True


def plot_runs(runs):
    """--plot: the PNGs next to the runs; returns their paths"""
    for run in runs:
        training_log(run)  # every run checked before anything is drawn
    names = [Path(r).name for r in runs]
    if len(runs) == 1:
        curves = Path(runs[0], 'training.png')
    else:  # several runs: one figure in the folder that holds them
        curves = Path(os.path.commonpath([os.path.abspath(r) for r in runs]), f"training_{'_'.join(names)}.png")
    plot_training(runs, curves)
    paths = [curves]
    for run in runs:
        if plot_load_over_training(run, Path(run, 'expert_load_training.png')):
            paths.append(Path(run, 'expert_load_training.png'))
        ej = Path(run, 'eval.json')
        out = json.loads(ej.read_text()) if ej.is_file() else {}
        if out.get('routing'):  # eval.py --analyze's load heatmap, from eval.json
            per_task = list(out['routing'].values())
            load = [[sum(t[j]['load'][e] for t in per_task) for e in range(len(per_task[0][j]['load']))]
                    for j in range(len(per_task[0]))]
            save_heatmap(Path(run, 'expert_load.png'), load, f"expert load: {run}\non {', '.join(out['routing'])}")
            paths.append(Path(run, 'expert_load.png'))
    return paths

# -----------------------------------------------------------------------------
# a run, eval.json, tables

def main_score(scores):
    return scores.get('acc_norm', scores.get('acc'))


def evaluate_run(run_dir, specs, task_manager, args):
    """eval.json's contents for a run, and its expert selections {task: [per layer ids]} when analysing"""
    model, ckpt, tokenizer, spec = load_run(run_dir, args.device, args.tokenizer)
    lm = MoELM(model, tokenizer, args.batch_size, args.device, args.dtype)
    layers, E = model.moe_layers(), model.config.n_experts
    lm.routing = {} if args.analyze and layers else None
    val = ckpt.get('best_val_loss')
    out = dict(command=args.command, run=str(run_dir), tokenizer=spec, iter_num=ckpt.get('iter_num'),
               best_val_loss=val if val is not None and val < 1e9 else None, model_args=ckpt['model_args'], tasks={}, ppl={},
               settings={k: getattr(args, k) for k in ('limit', 'batch_size', 'device', 'dtype', 'data_dir', 'stride',
                                                        'ppl_windows')})
    dropped = {}  # {task: dropped fraction per layer}, from the layers' counters

    def scored(name, job):
        for m in layers:
            m.reset_stats()
        lm.task = name
        result = job()
        dropped[name] = [m.stats()['dropped'] for m in layers]
        return result
    for name, task in specs.items():
        out['tasks'][name] = scored(name, lambda: zero_shot(lm, name, task, task_manager, args.limit))
    for src in args.ppl or []:  # perplexity's routings are analysed as one more task
        out['ppl'][src] = scored(f"ppl:{src}", lambda: perplexity(lm, *ppl_tokens(src, spec, lm.encode), args.stride,
                                                                        args.ppl_windows))
    scores = [main_score(s) for s in out['tasks'].values()]
    out['average'] = sum(scores) / len(scores) if scores else None
    if lm.routing is None:
        if args.analyze:
            print(f"{run_dir}: no MoE layers, nothing to analyse")
        return out, None
    out['routing'] = {t: [routing_metrics(torch.cat([i for i, _ in kept]), torch.cat([w for _, w in kept]), E)
                          | dict(dropped=dropped[t][j]) for j, kept in enumerate(per_layer)]
                      for t, per_layer in lm.routing.items()}
    sels = {t: [torch.cat([i for i, _ in kept]).short() for kept in per_layer] for t, per_layer in lm.routing.items()}
    lm.routing = None
    if min(s.shape[1] for per_layer in sels.values() for s in per_layer) > 1:  # slots per token (K >= top_k)
        for m in layers:
            m.drop_top1 = True
        out['drop_top1'] = {}
        for name, task in specs.items():
            scores = zero_shot(lm, name, task, task_manager, args.limit)
            out['drop_top1'][name] = {k: scores[k] - out['tasks'][name][k] for k in ('acc', 'acc_norm') if k in scores}
        for m in layers:
            m.drop_top1 = False
    else:
        print(f"{run_dir}: Drop-Top-1 skipped: with one slot per token (top_k = 1) no expert would be left")
    load = [[sum(r[j]['load'][e] for r in out['routing'].values()) for e in range(E)] for j in range(len(layers))]
    save_heatmap(Path(run_dir, 'expert_load.png'), load, f"expert load: {run_dir}\non {', '.join(out['routing'])}")
    return out, sels


def write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def merge_results(run_dir, out):
    """eval.json's new contents: this evaluation's results over the earlier ones of the same checkpoint, task by task
    (and --ppl source by source), each with the command that produced it; a changed checkpoint starts afresh"""
    path, stat = Path(run_dir, 'eval.json'), os.stat(Path(run_dir, 'ckpt.pt'))
    out['checkpoint'] = dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns)  # which ckpt.pt the numbers are of
    out['commands'] = {k: out['command'] for k in [*out['tasks'], *(f"ppl:{src}" for src in out['ppl'])]}
    old = json.loads(path.read_text()) if path.is_file() else None
    if old and old.get('checkpoint') != out['checkpoint']:
        print(f"{path}: {Path(run_dir, 'ckpt.pt')} changed since its earlier results: they are replaced")
    if not old or old.get('checkpoint') != out['checkpoint']:
        return out
    for key in ('tasks', 'ppl', 'drop_top1', 'routing', 'commands', 'over_checkpoints'):
        merged = {**old.get(key, {}), **out.get(key, {})}
        if merged:
            out[key] = merged
    scores = [main_score(s) for s in out['tasks'].values()]
    out['average'] = sum(scores) / len(scores) if scores else None
    return out


def fmt(x, scale=100):
    return '—' if x is None else f"{x * scale:.2f}"


def run_table(out):
    """markdown of one run: zero-shot scores, perplexities, routing statistics, each table with its own columns"""
    lines = [f"## {out['run']}"]
    if out['tasks']:
        lines += ['', '| task | acc | acc_norm | n | Drop-Top-1 Δ |', '|---|---|---|---|---|']
        for t, s in out['tasks'].items():
            d = out.get('drop_top1', {}).get(t, {})
            lines.append(f"| {t} | {fmt(s.get('acc'))} ± {fmt(s.get('acc_stderr'))} | {fmt(s.get('acc_norm'))} | "
                         f"{s['n']} | {fmt(main_score(d))} |")
    if out['ppl']:
        lines += ['', '| perplexity on | loss (nats/token) | ppl | bits per byte | tokens |', '|---|---|---|---|---|']
        lines += [f"| {src} | {p['loss']:.4f} | {p['ppl']:.3f} | {p['bpb']:.4f} | {p['tokens']} |"
                  for src, p in out['ppl'].items()]
    if 'routing' in out:
        lines += ['', '| routing on | layer | load CV | load entropy | experts/token | weight entropy | margin | dropped |',
                  '|---' * 8 + '|']
        lines += [f"| {t} | {j} | {r['load_cv']:.3f} | {r['load_entropy']:.3f} | {r.get('experts_per_token', 0):.2f} | "
                  f"{r['weight_entropy']:.3f} | {r['margin']:.3f} | {fmt(r['dropped'], 1)} |"
                  for t, per_layer in out['routing'].items() for j, r in enumerate(per_layer)]
    return '\n'.join(lines)


def checkpoints_table(oc):
    row = ' '.join
    lines = ['| task | checkpoint | change rate from the previous, per layer | saturation (agreement with the final) |',
             '|---|---|---|---|']
    for t, rates in oc['change_rate'].items():
        lines += [f"| {t} | {run} | {row(f'{x:.3f}' for x in rate) or '—'} | {row(f'{x:.3f}' for x in sat)} |"
                  for run, rate, sat in zip(oc['checkpoints'], [[]] + rates, oc['saturation'][t])]
    return '\n'.join(lines)


def compare_table(runs):
    """markdown, runs as rows, from their eval.json: each task's acc_norm in % (acc where it has none) and their
    average, the perplexity on each --ppl source, and the checkpoint's best val loss in training; a line above the
    table says so. Only the columns that some run has."""
    outs = []
    for run in runs:
        path = Path(run) if run.endswith('.json') else Path(run, 'eval.json')
        if not path.is_file():
            raise ValueError(f"no {path}: run python eval.py {run} --tasks ... (or --ppl ...) first")
        outs.append(json.loads(path.read_text()))
    tasks = list(dict.fromkeys(t for o in outs for t in o['tasks']))
    sources = list(dict.fromkeys(src for o in outs for src in o.get('ppl', {})))
    vals = any(o.get('best_val_loss') is not None for o in outs)
    notes = ([f"tasks: acc_norm in % (acc where a task has none), average over the {len(tasks)} tasks"] if tasks else [])
    notes += ['ppl: perplexity (per token) on each --ppl source'] if sources else []
    notes += ["val loss: the checkpoint's best validation loss in training"] if vals else []
    head = ['run', *tasks, *(['average'] if tasks else []), *(f'ppl {src}' for src in sources), *(['val loss'] if vals else [])]
    lines = ['; '.join(notes), '', '| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for o in outs:
        s = [main_score(o['tasks'][t]) if t in o['tasks'] else None for t in tasks]
        cells = [o['run'], *map(fmt, s)]
        if tasks:
            cells.append(fmt(None if None in s else sum(s) / len(s)))
        cells += [f"{o['ppl'][src]['ppl']:.3f}" if src in o.get('ppl', {}) else '—' for src in sources]
        if vals:
            cells.append(fmt(o.get('best_val_loss'), 1))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description='zero-shot tasks (lm-eval), perplexity and routing analysis of checkpoints')
    p.add_argument('runs', nargs='+', help='run folders holding ckpt.pt (with --compare: holding eval.json)')
    p.add_argument('--tasks', default='', help=f"comma-separated lm-eval task names; all = {','.join(LOCAL_TASKS)}")
    p.add_argument('--data_dir', help='read the tasks from these local files, not the hub (../shared/data/tasks)')
    p.add_argument('--limit', type=int, help='score only the first N documents of each task')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
                   help='autocast dtype; auto = bfloat16 where the hardware runs it fast, else float32')
    p.add_argument('--tokenizer', help='tokenizer spec where the checkpoint names none: gpt2, char, hf:..., gguf:...')
    p.add_argument('--ppl', action='append', help='a prepared data folder (its val.bin) or a text file; repeatable')
    p.add_argument('--stride', type=int, help='perplexity windows start every STRIDE tokens (default block_size)')
    p.add_argument('--ppl_windows', type=int, help='score only N windows of each --ppl source, evenly spaced over it '
                   '(a sample; bits per byte with the whole source\'s tokens per byte)')
    p.add_argument('--analyze', action='store_true', help='routing statistics, Drop-Top-1 and a load heatmap')
    p.add_argument('--checkpoints', action='store_true', help='the runs are checkpoints of one run, oldest first: '
                   'also change rate and saturation (implies --analyze)')
    p.add_argument('--compare', action='store_true', help="one markdown table from the runs' eval.json files")
    p.add_argument('--plot', action='store_true', help='training curves (one figure for all runs), expert load over '
                   'training and eval load heatmaps, from log.jsonl and eval.json: PNGs next to the runs')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.command = 'python eval.py ' + shlex.join(sys.argv[1:] if argv is None else argv)
    args.analyze = args.analyze or args.checkpoints
    datasets.disable_progress_bars()  # lm-eval maps hellaswag's 10,042 documents five times per task
    try:
        if args.plot:
            for path in plot_runs(args.runs):
                print(f"wrote {path}")
            return
        if args.compare:
            print(compare_table(args.runs))
            return
        names = list(LOCAL_TASKS) if args.tasks == 'all' else [t for t in args.tasks.split(',') if t]
        if not names and not args.ppl:
            raise ValueError("nothing to do: pass --tasks and/or --ppl")
        if args.checkpoints and len(args.runs) < 2:
            raise ValueError("--checkpoints needs two or more checkpoint folders of one run, oldest first")
        for run in args.runs:
            if not Path(run, 'ckpt.pt').is_file():
                raise ValueError(f"no checkpoint at {Path(run, 'ckpt.pt')}: train one with train.py "
                                 f"or make one with upcycle.py")
        for src in args.ppl or []:
            if not (Path(src, 'meta.json').is_file() or Path(src).is_file()):
                raise ValueError(f"--ppl {src}: not a prepared data folder (meta.json, val.bin) nor a text file")
            if Path(src).is_dir():
                check_data(src, load_meta(src))  # whole tokens, as many as meta.json says (ValueError, one line)
        if args.dtype == 'auto':
            args.dtype, why = auto_dtype(args.device.split(':')[0])
            print(f"dtype auto -> {args.dtype}: {why}")
        specs = task_specs(names, args.data_dir)
        # lm-eval's index of its own tasks takes ~20 s to build; local configs and perplexity need none
        task_manager = TaskManager(include_defaults=args.data_dir is None and bool(names))
        unknown = [n for n, s in specs.items() if isinstance(s, str) and n not in task_manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task {', '.join(unknown)}; `lm-eval ls tasks` lists them")
        outs, sels = [], []
        for run in args.runs:
            out, sel = evaluate_run(run, specs, task_manager, args)
            write_json(Path(run, 'eval.json'), merge_results(run, out))
            print(run_table(out) + '\n')
            outs.append(out)
            sels.append(sel)
        if args.checkpoints and sels[-1] is not None:  # into the final checkpoint's eval.json
            outs[-1]['over_checkpoints'] = dict(checkpoints=args.runs, **over_checkpoints(sels))
            write_json(Path(args.runs[-1], 'eval.json'), outs[-1])
            print(checkpoints_table(outs[-1]['over_checkpoints']) + '\n')
        if len(outs) > 1:
            print(compare_table(args.runs))
    except (ValueError, OSError) as e:  # bad input, an unloadable checkpoint, a missing file, no network: one line
        sys.exit(f"eval.py: error: {' '.join(str(e).split())}")


if __name__ == '__main__':
    main()
