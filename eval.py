"""
Zero-shot tasks through lm-eval, perplexity, and routing analysis of our checkpoints.

    python eval.py out/RUN --tasks piqa,arc_easy             # lm-eval's tasks, data from the hub
    python eval.py out/RUN --tasks all --data_dir ../shared/data/tasks --limit 200   # offline
    python eval.py out/A out/B --tasks piqa --data_dir ../shared/data/tasks --analyze
    python eval.py out/r/ckpt_1000 out/r --checkpoints --tasks piqa --data_dir ../shared/data/tasks
    python eval.py out/RUN --ppl data/gutenberg_gpt2 --ppl notes.txt [--stride 256]
    python eval.py --compare out/A out/B    # one markdown table of their eval.json
    python eval.py --plot out/A out/B       # training curves, expert load, eval heatmaps

- Scores match lm-eval's own `hf` model on the same weights (requests sorted by length,
  right-padded, one forward per batch, log-softmax in float32, left-truncated to block_size), so
  they sit next to any published lm-eval number (tests/test_eval.py: loglikelihoods within 1e-4).
  The default dtype is float32 on every machine, so one command gives one table everywhere; bf16
  autocast (faster, approximate) only when asked with --dtype, and eval.json records it.
- Offline (--data_dir), a task is lm-eval's own YAML with only the dataset swapped for the local
  file, laid out as the Hugging Face dataset the YAML names: prompts, metrics and the official
  document counts stay lm-eval's.
- Perplexity: windows of block_size tokens every --stride tokens, each scoring only the tokens no
  earlier window scored; bits per byte divide by the source's UTF-8 bytes, so tokenizers compare.
- The routing analysis (--analyze, --checkpoints) reads the routings of the forward passes that
  score the tasks, through moe.analysis; only Drop-Top-1 costs another pass.
- <run>/eval.json is written atomically and merged task by task with earlier results of the same
  checkpoint. The long form (definitions, statistics, eval.json's layout): docs/evaluation.md.
"""
import bz2
import json
import logging
import math
import os
import re
import shlex
import sys
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

import cli
import moe
from checkpoint import load_model, run_tokenizer, write_json
from moe import expert_load, load_stats, weight_sums
from prepare import check_data, load_meta

# -----------------------------------------------------------------------------
# settings: python eval.py RUN ... [--key=value ...]; bare arguments are run folders
DEFAULTS = dict(
    runs=[],  # run folders holding ckpt.pt (with --compare: holding eval.json)
    tasks='',  # comma-separated lm-eval task names; 'all' = every local task (LOCAL_TASKS)
    data_dir='',  # read the tasks from local files (../shared/data/tasks); '' = from the hub
    limit=0,  # score only the first N >= 1 documents of each task; unset (0) = all of them
    batch_size=16,  # sequences per forward
    device='auto',  # 'auto' = cuda where torch sees a GPU, else cpu
    # float32: lm-eval's hf model's numbers on every machine; bfloat16, float16 (autocast) or auto
    # (bfloat16 where the hardware runs it fast) are faster and approximate
    dtype='float32',
    tokenizer='',  # where the checkpoint names none: gpt2, char, hf:..., gguf:...; '' = its own
    ppl=[],  # perplexity on a prepared data folder (its val.bin) or a text file; repeatable
    stride=0,  # perplexity windows start every STRIDE >= 1 tokens; unset (0) = block_size
    ppl_windows=0,  # score N >= 1 windows of each --ppl source, evenly spaced; unset (0) = all
    analyze=False,  # routing statistics, Drop-Top-1 and a load heatmap
    routing_trace=False,  # every scoring forward's routing to <run>/routing_trace_eval.pt
    checkpoints=False,  # the runs are checkpoints of one run, oldest first: change rate, saturation
    compare=False,  # one markdown table from the runs' eval.json files
    plot=False,  # training curves, expert load over training, eval heatmaps: PNGs next to the runs
)
# the allowed values of the settings (cli.problem); the run folders and --ppl sources are checked
# before any work by the mode that reads them (check_inputs, compare_table, plot_runs)
LIMITS = dict(runs='text', tasks='text', data_dir='folder', limit='>= 1', batch_size='>= 1',
              device='text', dtype='dtype', tokenizer='text', ppl='text', stride='>= 1',
              ppl_windows='>= 1')
# the settings eval.json records (null where left unset)
RECORDED = ('limit', 'batch_size', 'device', 'dtype', 'data_dir', 'stride', 'ppl_windows')


def parse_args(argv):
    """the settings of a command line: DEFAULTS updated by argv, checked (ValueError, one line)"""
    c, given = cli.parse(DEFAULTS, argv, positional='runs', limits=LIMITS)
    if not c['runs']:
        raise ValueError("no run folder given: python eval.py out/RUN --tasks piqa (or --ppl FILE)")
    if 'limit' in given and not c['tasks']:
        raise ValueError("--limit counts the documents of each task, and no --tasks are given: "
                         "drop --limit (--ppl_windows samples a --ppl source)")
    return c

# -----------------------------------------------------------------------------
# local task files -> records laid out as the Hugging Face datasets that lm-eval's YAMLs name

def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def piqa_docs(d):
    """baber/piqa"""
    labels = Path(d, 'piqa/valid-labels.lst').read_text().split()
    rows = read_jsonl(Path(d, 'piqa/valid.jsonl'))
    return [dict(goal=r['goal'], sol1=r['sol1'], sol2=r['sol2'], label=int(y))
            for r, y in zip(rows, labels, strict=True)]


def arc_docs(d, name):
    """allenai/ai2_arc: the folder holds the HF export (id, question, choices, answerKey)"""
    return read_jsonl(Path(d, name, 'hf_format/test.jsonl'))


def winogrande_docs(d):
    """allenai/winogrande, winogrande_xl (the file also has qID)"""
    rows = read_jsonl(Path(d, 'winogrande/dev.jsonl'))
    return [{k: r[k] for k in ('sentence', 'option1', 'option2', 'answer')} for r in rows]


def lambada_docs(d):
    """EleutherAI/lambada_openai"""
    return [dict(text=r['text']) for r in read_jsonl(Path(d, 'lambada_openai/lambada_test.jsonl'))]


def boolq_docs(d):
    """aps/super_glue boolq: label 0 = false, 1 = true"""
    rows = read_jsonl(Path(d, 'boolq/val.jsonl'))
    return [{**r, 'label': int(str(r['label']).lower() == 'true')} for r in rows]


def copa_docs(d):
    """aps/super_glue copa: premise, choice1, choice2, question, label, idx"""
    return read_jsonl(Path(d, 'copa/val.jsonl'))


def openbookqa_docs(d):
    """allenai/openbookqa, main; the original TSV has choices as "(A) text (B) text ..." """
    docs = []
    for line in Path(d, 'openbookqa/test.tsv').read_text(encoding='utf-8').splitlines()[1:]:
        qid, stem, choices, _, key = line.split('\t')
        # [label, text, label, text, ...]
        parts = re.split(r'\s*\(([A-D])\)\s*', choices)[1:]
        choices = dict(text=parts[1::2], label=parts[0::2])
        docs.append(dict(id=qid, question_stem=stem, choices=choices, answerKey=key))
    return docs


def hellaswag_docs(d):
    """Rowan/hellaswag fields from 6 lines per item: "activity_label: ctx", gold, 4 endings;
    ctx_b is taken back as the unfinished sentence at the end of ctx (docs/evaluation.md)"""
    with bz2.open(Path(d, 'hellaswag/hellaswag_val_full.txt.bz2'), 'rt', encoding='utf-8') as f:
        lines = f.read().split('\n')
    docs = []
    for i in range(0, len(lines) - 5, 6):
        activity_label, ctx = lines[i].split(': ', 1)
        m = re.fullmatch(r'(.*[.!?]) ([^.!?]+)', ctx)
        ctx_a, ctx_b = m.groups() if m else (ctx, '')
        docs.append(dict(activity_label=activity_label, ctx_a=ctx_a, ctx_b=ctx_b, ctx=ctx,
                         endings=lines[i + 2:i + 6], label=lines[i + 1]))
    return docs


# name: (lm-eval's YAML under lm_eval/tasks, the split it scores, loader, official document count)
LOCAL_TASKS = {
    'piqa': ('piqa/piqa.yaml', 'validation', piqa_docs, 1838),
    'arc_easy': ('arc/arc_easy.yaml', 'test', partial(arc_docs, name='arc_easy'), 2376),
    'arc_challenge': ('arc/arc_challenge.yaml', 'test', partial(arc_docs, name='arc_challenge'),
                      1172),
    'winogrande': ('winogrande/default.yaml', 'validation', winogrande_docs, 1267),
    'lambada_openai': ('lambada/lambada_openai.yaml', 'test', lambada_docs, 5153),
    'boolq': ('super_glue/boolq/default.yaml', 'validation', boolq_docs, 3270),
    'openbookqa': ('openbookqa/openbookqa.yaml', 'test', openbookqa_docs, 500),
    'copa': ('super_glue/copa/default.yaml', 'validation', copa_docs, 100),
    'hellaswag': ('hellaswag/hellaswag.yaml', 'validation', hellaswag_docs, 10042),
}


# lm-eval's notice for datasets built by a function, about its --metadata option, does not apply
logging.getLogger('lm_eval.api.task').addFilter(lambda rec: 'Custom kwargs' not in rec.getMessage())


def local_dataset(loader, split, data_dir, **_):
    return datasets.DatasetDict({split: datasets.Dataset.from_list(loader(data_dir))})


def local_task_config(name, data_dir):
    """lm-eval's config of a task (its YAML, functions resolved), the local file as the dataset"""
    yaml, split, loader, _ = LOCAL_TASKS[name]
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / yaml, resolve_func=True)
    cfg.pop('tag', None)
    # zero-shot: only the scored split
    splits = dict(training_split=None, validation_split=None, test_split=None)
    splits['test_split' if split == 'test' else 'validation_split'] = split
    return {**cfg, **splits, 'dataset_path': str(Path(data_dir, name)), 'dataset_name': None,
            'custom_dataset': partial(local_dataset, loader, split, data_dir)}


def task_specs(names, data_dir=''):
    """{name: what simple_evaluate takes}: the name (lm-eval loads the hub data; data_dir '')
    or the local config"""
    if not data_dir:
        return {n: n for n in names}
    if not Path(data_dir).is_dir():
        raise ValueError(f"--data_dir {data_dir} is not a folder; point it at the task folders "
                         f"(../shared/data/tasks)")
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"no local task {', '.join(unknown)}; with --data_dir choose from "
                         f"{', '.join(LOCAL_TASKS)}")
    return {n: local_task_config(n, data_dir) for n in names}

# -----------------------------------------------------------------------------
# our model as an lm-eval LM

class MoELM(TemplateLM):
    def __init__(self, model, tokenizer, batch_size=16, device='cpu', dtype='float32'):
        """tokenizer: (encode, decode, vocab_size, eot_token), as prepare.load_tokenizer gives it"""
        super().__init__()
        self.model, self._device = model.eval(), device
        self.encode, self.decode, _, self.eot = tokenizer
        self.batch_size, self.max_length = batch_size, model.config.block_size
        self.autocast = cli.autocast(device.split(':')[0], dtype)
        # the task being scored: its routings are kept under its name
        self.task = None
        # while analysing: the layers' records (moe.analysis), a list per MoE layer, one per forward
        self.records = None
        # {task: [per MoE layer: [(ids, weights) of the real tokens, per forward]]}
        self.routing = {}

    @property
    def eot_token_id(self):
        return self.eot

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        try:
            return self.encode(string)
        except KeyError as e:
            # a character-level vocabulary that lacks a character of the task
            message = f"the tokenizer has no token for {e.args[0]!r}, which the task's text holds"
            raise ValueError(message) from e

    def logits(self, rows, spans, record=True):
        """token lists, right-padded, in one forward -> for each row the float32 logits
        (end - start, V) of its span (start, end) only, on the host (never the whole (B, S, V));
        while analysing, the routings of the real tokens are kept (record=False: dropped)"""
        lengths_B = torch.tensor([len(r) for r in rows])
        x_BS = torch.zeros(len(rows), int(lengths_B.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            x_BS[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        with torch.no_grad(), self.autocast:
            logits_BSV = self.model(x_BS.to(self._device))[0]
        if self.records is not None:
            # this forward's (ids, weights) of every layer, over its B*S positions
            last = [per_layer.pop() for per_layer in self.records]
            if record:
                real_N = (torch.arange(x_BS.shape[1])[None] < lengths_B[:, None]).view(-1)
                kept = self.routing.setdefault(self.task, [[] for _ in last])
                for j, (ids, w) in enumerate(last):
                    kept[j].append((ids[real_N], w[real_N]))
        # the whole vocabulary, as lm-eval's hf
        return [logits_BSV[b, s:e].float().cpu() for b, (s, e) in enumerate(spans)]

    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        """[((context, continuation), context ids, continuation ids)]
        -> [(log p(continuation), is greedy)]"""
        longest = max((len(continuation) for _, _, continuation in requests), default=0)
        if longest > self.max_length:
            # lm-eval's hf asserts the same
            raise ValueError(f"a continuation of {longest} tokens is longer than "
                             f"block_size={self.max_length}")
        whole = [context + continuation for _, context, continuation in requests]
        # longest first, as hf
        order = sorted(range(len(requests)), key=lambda i: (-len(whole[i]), tuple(whole[i])))
        results = [None] * len(requests)
        desc = f"loglikelihood {self.task or ''}"
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=desc)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            # left-truncated as lm-eval's hf
            rows = [whole[i][-(self.max_length + 1):][:-1] for i in batch]
            # the continuation's positions
            spans = [(len(r) - len(requests[i][2]), len(r)) for r, i in zip(rows, batch)]
            logits = self.logits(rows, spans)
            for b, i in enumerate(batch):
                cont = torch.tensor(requests[i][2])
                # (len(cont), V)
                lp = F.log_softmax(logits[b], dim=-1)
                greedy = bool((lp.argmax(-1) == cont).all())
                results[i] = (lp.gather(1, cont[:, None]).sum().item(), greedy)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.encode(req.args[0])
            for w in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
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
            until = kwargs.get('until') or []
            until = [until] if isinstance(until, str) else until
            ids, new = self.encode(context), []
            max_gen_toks = kwargs.get('max_gen_toks', 256)
            while len(new) < max_gen_toks and not any(u in self.decode(new) for u in until):
                row = (ids + new)[-self.max_length:]
                last = self.logits([row], [(len(row) - 1, len(row))], record=False)[0][-1]
                new.append(int(last.argmax()))
                if new[-1] == self.eot:
                    new.pop()
                    break
            text = self.decode(new)
            out.append(re.split('|'.join(map(re.escape, until)), text)[0] if until else text)
        return out

# -----------------------------------------------------------------------------
# a run's model and tokenizer, zero-shot scores, perplexity

def first_line(e):
    return (str(e).splitlines() or [''])[0]


def load_run(run_dir, device, tokenizer=''):
    """(model, checkpoint, (encode, decode, vocab_size, eot), tokenizer spec) of a run folder;
    tokenizer: the spec where the checkpoint names none ('' = the checkpoint's, else its data's)"""
    model, ckpt = load_model(run_dir, device)
    try:
        encode, decode, vocab_size, eot, spec = run_tokenizer(ckpt, tokenizer or None)
    except ValueError as e:
        raise ValueError(f"{run_dir}: {e}") from e
    return model, ckpt, (encode, decode, vocab_size, eot), spec


def zero_shot(lm, name, spec, task_manager, limit=0):
    """{metric: value} of one task (acc, acc_stderr, acc_norm, ...; n = documents scored);
    limit 0 = every document"""
    lm.task = name
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=[spec], task_manager=task_manager,
                                      limit=limit or None, bootstrap_iters=1000, log_samples=True)
    except OSError as e:
        # ConnectionError included
        if not isinstance(spec, str):
            raise
        raise ValueError(f"could not load task {name} from the hub ({type(e).__name__}: "
                         f"{first_line(e)}); offline, pass --data_dir ../shared/data/tasks") from e
    results = res['results'][name]
    # 'acc,none' -> 'acc'
    scores = {k.split(',')[0]: v for k, v in results.items()
              if ',' in k and isinstance(v, (int, float))}
    # each document's acc and acc_norm, as lm-eval's samples: the paired comparisons of study.py
    samples = sorted(res['samples'][name], key=lambda d: d['doc_id'])
    per_doc = {'doc_id': [d['doc_id'] for d in samples]}
    per_doc |= {k: [float(d[k]) for d in samples] for k in ('acc', 'acc_norm') if k in scores}
    return {**scores, 'n': res['n-samples'][name]['effective'], 'per_doc': per_doc}


def ppl_tokens(source, spec, encode):
    """(tokens, UTF-8 bytes of their text) of a prepared data folder's val.bin or of a text file"""
    if Path(source).is_dir():
        meta = load_meta(source)
        if meta['tokenizer'] != spec:
            raise ValueError(f"{source} was tokenized with {meta['tokenizer']} but the model uses "
                             f"{spec}: prepare it with the model's tokenizer")
        return np.memmap(Path(source, 'val.bin'), dtype=meta['dtype'], mode='r'), meta['val_bytes']
    # as prepare.py: CRLF stays CRLF
    with open(source, encoding='utf-8', newline='') as f:
        text = f.read()
    try:
        return np.array(encode(text), dtype=np.int64), len(text.encode('utf-8'))
    except KeyError as e:
        # a character-level vocabulary
        message = f"the tokenizer {spec} has no token for {e.args[0]!r}, which {source} holds"
        raise ValueError(message) from e


def perplexity(lm, tokens, n_bytes, stride=0, max_windows=0):
    """loss (nats per token), ppl and bits per byte, in windows of block_size tokens every `stride`
    tokens (0 = block_size); with max_windows, only that many of the windows, evenly spaced over the
    source (a sample: bits per byte then take the whole source's tokens per byte)"""
    T, N = lm.max_length, len(tokens)
    stride = min(stride or T, T)
    # (start, end, number of new targets at its end)
    windows, scored = [], 0
    for begin in range(0, N - 1, stride):
        end = min(begin + T, N - 1)
        windows.append((begin, end, end - scored))
        scored = end
        if end == N - 1:
            break
    if max_windows and max_windows < len(windows):
        windows = [windows[i * len(windows) // max_windows] for i in range(max_windows)]
    # each window's summed negative log-likelihood (nats), in the order of windows
    window_nll = []
    for i in tqdm(range(0, len(windows), lm.batch_size), desc=f"perplexity {lm.task or ''}"):
        batch = windows[i:i + lm.batch_size]
        # the n new targets at the end of each window
        spans = [(e - b - n, e - b) for b, e, n in batch]
        for row, (b, e, n) in zip(lm.logits([tokens[b:e] for b, e, _ in batch], spans), batch):
            # the targets of positions e-n .. e-1
            targets = torch.as_tensor(np.asarray(tokens[e - n + 1:e + 1], dtype=np.int64))
            window_nll.append(-F.log_softmax(row, dim=-1).gather(1, targets[:, None]).sum().item())
    # N - 1 unless sampled
    targets = sum(n for _, _, n in windows)
    loss = sum(window_nll) / targets
    bpb = loss / math.log(2) * N / n_bytes
    # the windows' own numbers: paired comparisons of two runs window by window (study.py)
    return dict(loss=loss, ppl=math.exp(loss), bpb=bpb, tokens=N, bytes=n_bytes, stride=stride,
                scored=targets, window_nll=window_nll, window_targets=[n for _, _, n in windows])

# -----------------------------------------------------------------------------
# routing analysis

def routing_metrics(ids, weights, n_experts):
    """one layer's routings of N tokens, ids and weights (N, K; K slots, UNUSED ones -1 with weight
    0, as moe.Routing) -> load per expert, its CV and entropy, the mean number of FFN experts per
    token, and, as moe.weight_sums (signed weights too), the mean entropy of the slots' weights
    (q = |w| / sum |w|), the mean router margin |w|_(1) - |w|_(2) (|w|_(1) when K = 1) and the
    share of the used slots with a negative weight"""
    # ids >= E (cheap experts) and UNUSED slots are not counted
    load = expert_load(ids, n_experts).float()
    entropy, margin, negative = weight_sums(weights)
    return dict(**load_stats(load), experts_per_token=(load.sum() / len(ids)).item(),
                weight_entropy=(entropy / len(ids)).item(), margin=(margin / len(ids)).item(),
                negative=(negative / (ids >= 0).sum().clamp_min(1)).item())


def traced_routing(run_dir, n_experts):
    """the routing traces train.py and sample.py wrote in run_dir (routing_trace*.pt,
    moe.save_trace) -> {'trace:<file stem>': [routing_metrics per MoE layer over every traced
    forward]}"""
    out = {}
    for path in sorted(Path(run_dir).glob('routing_trace*.pt')):
        layers = moe.load_trace(path)
        out[f'trace:{path.stem}'] = [
            routing_metrics(torch.cat([r['ids'] for r in recs]),
                            torch.cat([r['weights'] for r in recs]), n_experts) | dict(dropped=None)
            for recs in layers if recs]
    return out


def change_rate(ids_a, ids_b):
    """share of top-k slots whose expert differs, slot by slot on the sorted ids (N, k) of the same
    tokens"""
    if ids_a.shape != ids_b.shape:
        raise ValueError("the checkpoints routed different eval tokens: they need the same "
                         "tokenizer, tasks and limit")
    return (ids_a.sort(-1).values != ids_b.sort(-1).values).float().mean().item()


def over_checkpoints(sels):
    """sels: per checkpoint {task: [per layer ids (N, k)]} -> change rate between consecutive
    checkpoints and saturation (1 - change rate against the final checkpoint), per task and layer"""
    def rates(s0, s1, t):
        """per layer"""
        return [change_rate(a, b) for a, b in zip(s0[t], s1[t])]
    tasks, final = sels[-1], sels[-1]
    change = {t: [rates(s0, s1, t) for s0, s1 in zip(sels, sels[1:])] for t in tasks}
    saturation = {t: [[1 - r for r in rates(s, final, t)] for s in sels] for t in tasks}
    return dict(change_rate=change, saturation=saturation)


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
    image = ax.imshow(share, cmap='viridis', aspect='auto')
    fig.colorbar(image, ax=ax, label='share of assignments')
    ax.set(xlabel='expert', ylabel='MoE layer', title=title, xticks=range(share.shape[1]),
           yticks=range(share.shape[0]))
    fig.savefig(path, dpi=120, bbox_inches='tight', metadata={'Title': title})
    plt.close(fig)

# -----------------------------------------------------------------------------
# plots (--plot): training curves of one or several runs, each layer's expert load over training,
# eval heatmaps

def training_log(run):
    """(train rows, eval rows) of run/log.jsonl; skipped steps (a non-finite loss, logged as text)
    left out"""
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
    """one figure, one colour per run: train and val loss, balance (aux) loss, z-loss, load CV of
    each MoE layer"""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color'] * len(runs)
    for run, color in zip(runs, colors):
        train, evals = training_log(run)
        name = Path(run).name
        it = [r['iter'] for r in train]
        axes[0].plot(it, [r['loss'] for r in train], color=color, alpha=0.6, label=f"{name} train")
        axes[0].plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o--', color=color,
                     label=f"{name} val")
        for ax, key in ((axes[1], 'aux_loss'), (axes[2], 'z_loss')):
            ax.plot(it, [r.get(key, float('nan')) for r in train], color=color, label=name)
        # (logs, layers)
        cvs = np.array([r['layer_load_cv'] for r in train if r.get('layer_load_cv')])
        kept = [r['iter'] for r in train if r.get('layer_load_cv')]
        for j in range(cvs.shape[1] if cvs.ndim == 2 else 0):
            axes[3].plot(kept, cvs[:, j], color=color, alpha=0.4 + 0.6 * (j + 1) / cvs.shape[1],
                         linestyle=['-', '--', ':', '-.'][j % 4], label=f"{name} layer {j}")
    titles = ('loss (line: train, dots: val)', 'balance loss (1 = balanced)', 'router z-loss',
              'load CV per MoE layer')
    for ax, title in zip(axes, titles):
        ax.set(xlabel='iteration', title=title)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def plot_load_over_training(run, path):
    """each MoE layer's expert load over training: a heatmap of the share of assignments
    (iteration x expert)"""
    train, _ = training_log(run)
    rows = [r for r in train if r.get('layer_load')]
    if not rows:
        return False
    # (logs, layers, experts)
    load = np.array([r['layer_load'] for r in rows], dtype=float)
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    it, (n_logs, L, E) = [r['iter'] for r in rows], share.shape
    plt = pyplot()
    size = (10, 0.6 + (1.0 + 0.18 * E) * L)
    fig, axes = plt.subplots(L, 1, figsize=size, squeeze=False, sharex=True)
    step = (it[-1] - it[0]) / max(n_logs - 1, 1) if n_logs > 1 else 1
    extent = (it[0] - step / 2, it[-1] + step / 2, E - 0.5, -0.5)
    for j, ax in enumerate(axes[:, 0]):
        im = ax.imshow(share[:, j].T, aspect='auto', cmap='viridis', vmin=0,
                       vmax=max(share.max(), 1e-9), extent=extent, interpolation='nearest')
        ax.set(ylabel=f"layer {j}\nexpert", yticks=range(E))
    axes[-1, 0].set_xlabel('iteration')
    axes[0, 0].set_title(f"expert load over training: {run} (share of each layer's assignments; "
                         f"1/{E} = balanced)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label='share of assignments')
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return True


def summed_load(routing):
    """eval.json's routing {task: [per layer metrics]} -> each layer's load per expert, summed over
    the tasks"""
    per_task = list(routing.values())
    n_layers, n_experts = len(per_task[0]), len(per_task[0][0]['load'])
    return [[sum(t[j]['load'][e] for t in per_task) for e in range(n_experts)]
            for j in range(n_layers)]


def plot_runs(runs):
    """--plot: the PNGs next to the runs; returns their paths"""
    # every run checked before anything is drawn
    for run in runs:
        training_log(run)
    names = [Path(r).name for r in runs]
    if len(runs) == 1:
        curves = Path(runs[0], 'training.png')
    else:
        # several runs: one figure in the folder that holds them
        common = os.path.commonpath([os.path.abspath(r) for r in runs])
        curves = Path(common, f"training_{'_'.join(names)}.png")
    plot_training(runs, curves)
    paths = [curves]
    for run in runs:
        if plot_load_over_training(run, Path(run, 'expert_load_training.png')):
            paths.append(Path(run, 'expert_load_training.png'))
        ej = Path(run, 'eval.json')
        out = json.loads(ej.read_text()) if ej.is_file() else {}
        if out.get('routing'):
            # eval.py --analyze's load heatmap, from eval.json
            title = f"expert load: {run}\non {', '.join(out['routing'])}"
            save_heatmap(Path(run, 'expert_load.png'), summed_load(out['routing']), title)
            paths.append(Path(run, 'expert_load.png'))
    return paths

# -----------------------------------------------------------------------------
# a run, eval.json, tables

def main_score(scores):
    return scores.get('acc_norm', scores.get('acc'))


def average(tasks):
    scores = [main_score(s) for s in tasks.values()]
    return sum(scores) / len(scores) if scores else None


def evaluate_run(run_dir, specs, task_manager, c, device, dtype, analyze, command):
    """eval.json's contents for a run, and its expert selections {task: [per layer ids]} when
    analysing. c: the settings; device and dtype as picked; analyze: routing statistics and
    Drop-Top-1"""
    model, ckpt, tokenizer, spec = load_run(run_dir, device, c['tokenizer'])
    lm = MoELM(model, tokenizer, c['batch_size'], device, dtype)
    layers, E = model.moe_layers(), model.config.n_experts
    record = analyze and bool(layers)
    val = ckpt.get('best_val_loss')
    # a run that never evaluated keeps train.py's 1e9
    best_val_loss = val if val is not None and val < 1e9 else None
    settings = dict(c, device=device, dtype=dtype)
    out = dict(command=command, run=str(run_dir), tokenizer=spec, iter_num=ckpt.get('iter_num'),
               best_val_loss=best_val_loss, model_args=ckpt['model_args'], tasks={}, ppl={},
               settings={k: settings[k] or None for k in RECORDED})
    # {task: dropped fraction per layer}, from the layers' counters
    dropped = {}

    def scored(name, job):
        for m in layers:
            m.reset_stats()
        lm.task = name
        result = job()
        dropped[name] = [m.stats()['dropped'] for m in layers]
        return result
    trace = [[] for _ in layers] if c['routing_trace'] and layers else None
    with moe.routing(model, trace=trace), moe.analysis(model, record=record) as records:
        lm.records = records if record else None
        for name, task in specs.items():
            job = partial(zero_shot, lm, name, task, task_manager, c['limit'])
            out['tasks'][name] = scored(name, job)
        # perplexity's routings are analysed as one more task
        for src in c['ppl']:
            tokens, n_bytes = ppl_tokens(src, spec, lm.encode)
            job = partial(perplexity, lm, tokens, n_bytes, c['stride'], c['ppl_windows'])
            out['ppl'][src] = scored(f"ppl:{src}", job)
        lm.records = None
    if trace is not None:
        moe.save_trace(Path(run_dir, 'routing_trace_eval.pt'), trace)
    out['average'] = average(out['tasks'])
    if not record:
        if analyze:
            print(f"{run_dir}: no MoE layers, nothing to analyse")
        return out, None
    out['routing'] = {}
    sels = {}
    for t, per_layer in lm.routing.items():
        ids = [torch.cat([i for i, _ in kept]) for kept in per_layer]
        weights = [torch.cat([w for _, w in kept]) for kept in per_layer]
        out['routing'][t] = [routing_metrics(i, w, E) | dict(dropped=dropped[t][j])
                             for j, (i, w) in enumerate(zip(ids, weights))]
        sels[t] = [i.short() for i in ids]
    # the run folder's routing traces, as more tasks (no dropped fraction: a trace holds none)
    out['routing'] |= traced_routing(run_dir, E)
    # Drop-Top-1 needs two or more slots per token (K >= top_k)
    if min(s.shape[1] for per_layer in sels.values() for s in per_layer) > 1:
        out['drop_top1'] = {}
        with moe.analysis(model, drop_top1=True):
            for name, task in specs.items():
                scores = zero_shot(lm, name, task, task_manager, c['limit'])
                base = out['tasks'][name]
                out['drop_top1'][name] = {k: scores[k] - base[k] for k in ('acc', 'acc_norm')
                                          if k in scores}
    else:
        print(f"{run_dir}: Drop-Top-1 skipped: with one slot per token (top_k = 1) no expert would "
              f"be left")
    title = f"expert load: {run_dir}\non {', '.join(out['routing'])}"
    save_heatmap(Path(run_dir, 'expert_load.png'), summed_load(out['routing']), title)
    return out, sels


def merge_results(run_dir, out):
    """eval.json's new contents: this evaluation's results over the earlier ones of the same
    checkpoint, task by task (and --ppl source by source), each with the command that produced it;
    a changed checkpoint starts afresh"""
    path, stat = Path(run_dir, 'eval.json'), os.stat(Path(run_dir, 'ckpt.pt'))
    # which ckpt.pt the numbers are of
    out['checkpoint'] = dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    scored = [*out['tasks'], *(f"ppl:{src}" for src in out['ppl'])]
    out['commands'] = {k: out['command'] for k in scored}
    old = json.loads(path.read_text()) if path.is_file() else None
    if old and old.get('checkpoint') != out['checkpoint']:
        print(f"{path}: {Path(run_dir, 'ckpt.pt')} changed since its earlier results: they are "
              f"replaced")
    if not old or old.get('checkpoint') != out['checkpoint']:
        return out
    for key in ('tasks', 'ppl', 'drop_top1', 'routing', 'commands', 'over_checkpoints'):
        merged = {**old.get(key, {}), **out.get(key, {})}
        if merged:
            out[key] = merged
    out['average'] = average(out['tasks'])
    return out


def fmt(x, scale=100):
    return '—' if x is None else f"{x * scale:.2f}"


def run_table(out):
    """markdown of one run: zero-shot scores, perplexities, routing statistics, each table with
    its own columns"""
    lines = [f"## {out['run']}"]
    if out['tasks']:
        lines += ['', '| task | acc | acc_norm | n | Drop-Top-1 Δ |', '|---|---|---|---|---|']
        for t, s in out['tasks'].items():
            d = out.get('drop_top1', {}).get(t, {})
            lines.append(f"| {t} | {fmt(s.get('acc'))} ± {fmt(s.get('acc_stderr'))} | "
                         f"{fmt(s.get('acc_norm'))} | {s['n']} | {fmt(main_score(d))} |")
    if out['ppl']:
        lines += ['', '| perplexity on | loss (nats/token) | ppl | bits per byte | tokens |',
                  '|---|---|---|---|---|']
        lines += [f"| {src} | {p['loss']:.4f} | {p['ppl']:.3f} | {p['bpb']:.4f} | {p['tokens']} |"
                  for src, p in out['ppl'].items()]
    if 'routing' in out:
        head = ('| routing on | layer | load CV | load entropy | experts/token | weight entropy '
                '| margin | dropped |')
        lines += ['', head, '|---' * 8 + '|']
        lines += [f"| {t} | {j} | {r['load_cv']:.3f} | {r['load_entropy']:.3f} | "
                  f"{r.get('experts_per_token', 0):.2f} | {r['weight_entropy']:.3f} | "
                  f"{r['margin']:.3f} | {fmt(r['dropped'], 1)} |"
                  for t, per_layer in out['routing'].items() for j, r in enumerate(per_layer)]
    return '\n'.join(lines)


def checkpoints_table(oc):
    def row(xs):
        return ' '.join(f'{x:.3f}' for x in xs)
    head = ('| task | checkpoint | change rate from the previous, per layer '
            '| saturation (agreement with the final) |')
    lines = [head, '|---|---|---|---|']
    for t, rates in oc['change_rate'].items():
        lines += [f"| {t} | {run} | {row(rate) or '—'} | {row(sat)} |"
                  for run, rate, sat in zip(oc['checkpoints'], [[]] + rates, oc['saturation'][t])]
    return '\n'.join(lines)


def compare_table(runs):
    """markdown, runs as rows, from their eval.json: each task's acc_norm in % (acc where it has
    none) and their average, the perplexity on each --ppl source, and the checkpoint's best val loss
    in training; a line above the table says so. Only the columns that some run has."""
    outs = []
    for run in runs:
        path = Path(run) if run.endswith('.json') else Path(run, 'eval.json')
        if not path.is_file():
            raise ValueError(f"no {path}: run python eval.py {run} --tasks ... (or --ppl ...) "
                             f"first")
        outs.append(json.loads(path.read_text()))
    tasks = list(dict.fromkeys(t for o in outs for t in o['tasks']))
    sources = list(dict.fromkeys(src for o in outs for src in o.get('ppl', {})))
    vals = any(o.get('best_val_loss') is not None for o in outs)
    notes = []
    if tasks:
        notes.append(f"tasks: acc_norm in % (acc where a task has none), average over the "
                     f"{len(tasks)} tasks")
    if sources:
        notes.append('ppl: perplexity (per token) on each --ppl source')
    if vals:
        notes.append("val loss: the checkpoint's best validation loss in training")
    head = ['run', *tasks, *(['average'] if tasks else []), *(f'ppl {src}' for src in sources),
            *(['val loss'] if vals else [])]
    lines = ['; '.join(notes), '', '| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for o in outs:
        s = [main_score(o['tasks'][t]) if t in o['tasks'] else None for t in tasks]
        cells = [o['run'], *map(fmt, s)]
        if tasks:
            cells.append(fmt(None if None in s else sum(s) / len(s)))
        ppl = o.get('ppl', {})
        cells += [f"{ppl[src]['ppl']:.3f}" if src in ppl else '—' for src in sources]
        if vals:
            cells.append(fmt(o.get('best_val_loss'), 1))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def check_inputs(c, names):
    """the runs and --ppl sources exist (ValueError, one line with the fix)"""
    if not names and not c['ppl']:
        raise ValueError("nothing to do: pass --tasks and/or --ppl")
    if c['checkpoints'] and len(c['runs']) < 2:
        raise ValueError("--checkpoints needs two or more checkpoint folders of one run, oldest "
                         "first")
    for run in c['runs']:
        if not Path(run, 'ckpt.pt').is_file():
            raise ValueError(f"no checkpoint at {Path(run, 'ckpt.pt')}: train one with train.py "
                             f"or make one with upcycle.py")
    for src in c['ppl']:
        if not (Path(src, 'meta.json').is_file() or Path(src).is_file()):
            raise ValueError(f"--ppl {src}: not a prepared data folder (meta.json, val.bin) nor a "
                             f"text file")
        if Path(src).is_dir():
            # whole tokens, as many as meta.json says
            check_data(src, load_meta(src))


def evaluate(c, command):
    """every run of the settings c: eval.json written, tables printed"""
    names = list(LOCAL_TASKS) if c['tasks'] == 'all' else [t for t in c['tasks'].split(',') if t]
    check_inputs(c, names)
    device = cli.pick_device(c['device'])
    dtype, why = cli.pick_dtype(c['dtype'], device.split(':')[0])
    if why:
        print(f"dtype auto -> {dtype}: {why}")
    specs = task_specs(names, c['data_dir'])
    # lm-eval's index of its own tasks takes ~20 s to build; local configs and perplexity need none
    task_manager = TaskManager(include_defaults=not c['data_dir'] and bool(names))
    hub = [n for n, spec in specs.items() if isinstance(spec, str)]
    unknown = [n for n in hub if n not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task {', '.join(unknown)}; `lm-eval ls tasks` lists "
                         f"them")
    analyze = c['analyze'] or c['checkpoints']
    outs, sels = [], []
    for run in c['runs']:
        out, sel = evaluate_run(run, specs, task_manager, c, device=device, dtype=dtype,
                                analyze=analyze, command=command)
        write_json(Path(run, 'eval.json'), merge_results(run, out))
        print(run_table(out) + '\n')
        outs.append(out)
        sels.append(sel)
    if c['checkpoints'] and sels[-1] is not None:
        # into the final checkpoint's eval.json
        outs[-1]['over_checkpoints'] = dict(checkpoints=c['runs'], **over_checkpoints(sels))
        write_json(Path(c['runs'][-1], 'eval.json'), outs[-1])
        print(checkpoints_table(outs[-1]['over_checkpoints']) + '\n')
    if len(outs) > 1:
        print(compare_table(c['runs']))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = 'python eval.py ' + shlex.join(argv)
    # lm-eval maps hellaswag's 10,042 documents five times per task
    datasets.disable_progress_bars()
    # bad input, an unloadable checkpoint, a missing file, no network: one line
    with cli.errors('eval.py'):
        c = parse_args(argv)
        if c['plot']:
            for path in plot_runs(c['runs']):
                print(f"wrote {path}")
        elif c['compare']:
            print(compare_table(c['runs']))
        else:
            evaluate(c, command)


if __name__ == '__main__':
    main()
