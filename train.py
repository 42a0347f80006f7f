"""
Train a GPT with (or without) Mixture-of-Experts layers. One process:
$ python train.py configs/sigmoid.py
DDP on one node, gloo on CPU and nccl on GPU, chosen automatically:
$ torchrun --standalone --nproc_per_node=2 train.py configs/sigmoid.py
Expert parallelism, experts sharded over the ranks (ep_size must divide the world size and n_experts):
$ torchrun --standalone --nproc_per_node=2 train.py configs/sigmoid.py --ep_size=2

The defaults below train a small character-level model on CPU in minutes (python prepare.py first).
Batches are drawn from a generator seeded by (seed, iteration), so the tokens of a step depend on the seed
and the global batch only: 1 and N processes given the same values train on the same tokens, and a resumed
run continues exactly where it stopped (the iteration is the data position).
"""
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import moe
from configurator import parse
from checkpoint import load_checkpoint, save_checkpoint
from cli import auto_dtype
from model import GPT, GPTConfig
from prepare import check_data, load_meta

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out'
eval_interval = 100  # evaluate (and maybe checkpoint) every this many iterations
log_interval = 10
progress_interval = 10.0  # seconds: a slow phase (an evaluation, a long step) prints its progress this often
eval_iters = 20  # validation batches per evaluation (a fixed set, split over the ranks)
always_save_checkpoint = False  # save at every evaluation, not only when val loss improves
keep_checkpoints = False  # also keep each saved checkpoint as out_dir/iter_N/ckpt.pt (eval.py --checkpoints)
save_optimizer = True  # False: checkpoints hold the weights only (a third of the size with AdamW): enough for
                       # eval.py, export and sampling, and init_from=<folder>, but not for init_from='resume'
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir) or a checkpoint folder (e.g. made by upcycle.py)
wandb_log = False  # also log to Weights & Biases (pip install wandb; imported only when on)
wandb_project = 'nanomoe'  # the W&B project
wandb_run_name = 'run'  # the W&B run's name
# data
dataset = 'shakespeare_char'  # data/<dataset>/{train,val}.bin and meta.json, made by prepare.py
gradient_accumulation_steps = 2  # micro-batches per step over all ranks (divided over the ranks)
batch_size = 16  # sequences per micro-batch
block_size = 128
# model
arch = 'gpt2'  # 'gpt2' or 'llama'
n_layer = 4
n_head = 4
n_kv_head = 0  # llama grouped-query attention (0 = n_head)
n_embd = 128
mlp_hidden = 0  # dense MLP hidden size (0 = 4 * n_embd)
dropout = 0.0
bias = False
tie_embeddings = True
rope_theta = 10000.0
# MoE
router = 'dense'  # 'dense' (no MoE) or one of moe.ROUTERS
n_experts = 8
top_k = 2
moe_every = 1  # every n-th layer is MoE (2 = every other layer)
moe_first_dense = 0  # the first N layers stay dense
expert_hidden = 0  # expert hidden size (0 = mlp_hidden); smaller for fine-grained experts
n_shared_experts = 0  # always-on shared experts (DeepSeekMoE)
shared_scale = 1.0  # weight of the shared experts' output
routed_scale = 1.0  # weight of the routed experts' output (DeepSeek-V3: 2.5)
router_renorm = True  # divide the top-k weights by their sum
capacity_factor = 0.0  # 0 = dropless; else each expert takes ceil(cf * k * T / E) assignments
eval_capacity_factor = 0.0  # capacity at evaluation; 0 = dropless (eval-time drops inflate the loss)
expert_impl = 'auto'  # 'grouped' (one F.grouped_mm over all experts), 'loop' (a matmul per expert), 'auto' per device
aux_loss_coef = 0.01  # balance loss coefficient
z_loss_coef = 0.001  # router z-loss coefficient
balance_scope = 'batch'  # balance loss's f over 'batch' (micro-batch), 'sequence', 'global' (the step, every rank; Qwen3)
force_balance = False  # benchmarking only: balanced round-robin routing in place of the router's (Megatron, torchtitan)
shared_gate = False  # Qwen2-MoE: sigmoid(w . x) scales the shared experts' output
ep_size = 1  # expert parallelism: ranks that share one set of experts
globals().update(moe.router_settings())  # router-specific options, defaults and comments in moe.py's router classes
# optimizer
learning_rate = 1e-3
max_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip gradients at this global norm (0 = off)
router_lr_scale = 1.0  # learning rate multiplier of the router parameters
# learning rate schedule: linear warmup, then cosine decay to min_lr
warmup_iters = 50
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-4
# system
device = 'auto'  # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto' (bf16 where the hardware runs it fast, else float32), 'float32', 'bfloat16', 'float16'
compile = False  # torch.compile the model
seed = 1337
deterministic = False  # deterministic kernels (GPU runs repeat bit for bit, somewhat slower; README: Determinism)
max_bad_steps = 5  # stop after this many steps in a row with a non-finite loss or gradient norm (each is skipped)
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = known only for A100/H100/H200 in bf16/fp16 (else no MFU)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
# Model keys (GPTConfig's fields, the router options) are architecture, fixed by a checkpoint, except these training
# knobs: init_from and resume take them from the checkpoint unless given, and a given one wins (e.g. DeepSeek-V3's
# last phase: --init_from=resume --bias_update_rate=0.0)
train_keys = ('dropout', 'capacity_factor', 'eval_capacity_factor', 'aux_loss_coef', 'z_loss_coef',
              'router_jitter', 'hyper_k_schedule', 'hyper_k_min', 'bias_update_rate', 'null_reward', 'moepp_tau',
              'balance_scope', 'force_balance', 'remoe_l1_init', 'remoe_l1_alpha', 'topp_threshold', 'topp_max',
              'topp_entropy_coef', 'ec_capacity_factor')
machine_keys = ('init_from', 'out_dir', 'device', 'compile', 'ep_size', 'expert_impl')  # resume never takes these from the checkpoint
dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16, 'auto': None}


def fail(message):
    """an expected error (bad input, a bad file): one line, exit status 1"""
    sys.exit(f"train.py: error: {message}")


def config_problem(c):
    """the first value outside its range, as one line (configure checks the types)"""
    at_least_1 = ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval',
                  'eval_iters', 'n_layer', 'n_head', 'n_embd', 'n_experts', 'top_k', 'moe_every', 'ep_size',
                  'max_bad_steps')
    at_least_0 = ('max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay', 'grad_clip', 'router_lr_scale',
                  'n_kv_head', 'mlp_hidden', 'moe_first_dense', 'expert_hidden', 'n_shared_experts', 'capacity_factor',
                  'aux_loss_coef', 'z_loss_coef', 'peak_flops', 'progress_interval')
    choices = dict(arch=('gpt2', 'llama'), router=('dense', *moe.ROUTERS), dtype=tuple(dtypes),
                   balance_scope=('batch', 'sequence', 'global'))
    for k in at_least_1:
        if c[k] < 1:
            return f"{k}={c[k]} must be at least 1"
    for k in at_least_0:
        if c[k] < 0:
            return f"{k}={c[k]} must not be negative"
    for k in ('dropout', 'beta1', 'beta2'):
        if not 0 <= c[k] < 1:
            return f"{k}={c[k]} must be in [0, 1)"
    for k in ('learning_rate',):
        if not c[k] > 0:
            return f"{k}={c[k]} must be positive"
    for k, allowed in choices.items():
        if c[k] not in allowed:
            return f"{k}={c[k]!r} is not one of {', '.join(map(repr, allowed))}"
    if c['min_lr'] > c['learning_rate']:
        return f"min_lr={c['min_lr']} is above learning_rate={c['learning_rate']}: set --min_lr (e.g. learning_rate / 10)"


def contradictions(old, asked):
    """the keys of asked (architecture key -> value) whose value differs from the checkpoint's model_args old,
    with 0s resolved as GPTConfig resolves them (mlp_hidden=0 is 4 * n_embd, ...)"""
    opts = {k: v for k, v in asked.items() if k in old['router_options']}
    new = {**old, **{k: v for k, v in asked.items() if k in old}, 'router_options': {**old['router_options'], **opts}}
    try:
        new = asdict(GPTConfig(**new))
    except ValueError:
        pass  # compared as given
    new, old = {**new, **new['router_options']}, {**old, **old['router_options']}
    return [k for k in asked if new.get(k) != old.get(k)]


try:
    config, given = parse({k: globals()[k] for k in config_keys}, sys.argv[1:])  # given: key -> where it was set
except ValueError as e:
    fail(e)
ckpt = model_args = ckpt_path = None
if config['init_from'] != 'scratch':  # the model, and on resume the whole run, come from the checkpoint
    ckpt_dir = config['out_dir'] if config['init_from'] == 'resume' else config['init_from']
    try:
        ckpt, ckpt_path, note = load_checkpoint(ckpt_dir, fallback=config['init_from'] == 'resume')
    except ValueError as e:
        fail(e)
    if note and int(os.environ.get('RANK', 0)) == 0:
        print(note)
    if config['init_from'] == 'resume' and 'optimizer' not in ckpt:  # weights only, or made by upcycle.py
        fail(f"{ckpt_path} holds the weights only (no optimizer state) and cannot be resumed: start a new run "
             f"from it with --init_from={os.path.dirname(ckpt_path)} --out_dir=<another folder>")
    if config['init_from'] == 'resume':  # the run goes on as it was: every key not given is the checkpoint's
        config.update({k: v for k, v in (ckpt.get('config') or {}).items()
                       if k in config and k not in given and k not in machine_keys})
    old = ckpt['model_args']
    arch = [f.name for f in fields(GPTConfig)] + list(old['router_options'])
    asked = {k: config[k] for k in given if k in arch and k not in train_keys and k not in ('block_size', 'ep_size')}
    bad = contradictions(old, asked)
    if bad:
        fail(f"{ckpt_path} holds a model with "
             + ', '.join(f"{k}={({**old, **old['router_options']}).get(k)!r}" for k in bad) + "; the config asks for "
             + ', '.join(f"{k}={config[k]!r} ({given[k]})" for k in bad)
             + ": the architecture comes from the checkpoint, drop these settings (or train from scratch)")
    model_args = {**old, 'router_options': dict(old['router_options'])}
    for k in train_keys:  # given, or the checkpoint's (also where the checkpoint predates the key)
        if k in given:
            where = model_args if k in {f.name for f in fields(GPTConfig)} else model_args['router_options']
            where[k] = config[k]
    if config['block_size'] > old['block_size'] and 'block_size' in given:
        fail(f"block_size={config['block_size']} ({given['block_size']}) is longer than the {old['block_size']} "
             f"positions of the model in {ckpt_path}: use at most {old['block_size']}")
    config['block_size'] = min(config['block_size'], old['block_size'])  # train on at most the model's length
    config.update({k: v for k, v in {**model_args, **model_args['router_options']}.items()
                   if k in config and k not in ('block_size', 'ep_size')})  # config.json records what runs
problem = config_problem(config)
if problem:
    fail(problem)
globals().update(config)
lr_decay_iters = lr_decay_iters or max_iters
if deterministic:  # cuBLAS needs a fixed workspace for it, set before its first use
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
# -----------------------------------------------------------------------------
# processes, groups and devices

if device != 'auto':
    try:
        kind = torch.device(device).type
    except RuntimeError:
        fail(f"device={device!r} is not a device torch knows: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if kind not in ('cpu', 'cuda'):
        fail(f"device={device!r}: train.py runs on 'cpu' or 'cuda' ('auto' picks cuda where there is one)")
    if kind == 'cuda' and not torch.cuda.is_available():
        fail(f"device={device!r} but this torch ({torch.__version__}) sees no CUDA device: use --device=cpu or auto")
    if kind == 'cuda' and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        fail(f"device={device!r} but there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
ddp = int(os.environ.get('RANK', -1)) != -1
use_cuda = device.startswith('cuda') or (device == 'auto' and torch.cuda.is_available())
if ddp:
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    device = f'cuda:{local_rank}' if use_cuda else 'cpu'
    if use_cuda:
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
    device = ('cuda' if use_cuda else 'cpu') if device == 'auto' else device
master = rank == 0
interrupted = False


def on_signal(signum, frame):
    """Ctrl-C: SIGINT (torchrun passes it on to every rank; SIGTERM from a scheduler too): stop where we are"""
    global interrupted
    interrupted = True
    raise KeyboardInterrupt


def on_uncaught(kind, value, tb):
    """after Ctrl-C, one line saying where the last checkpoint is instead of a traceback from every rank (a rank
    whose peer stopped first sees a failed collective: the same interruption)"""
    if not (issubclass(kind, KeyboardInterrupt) or interrupted):
        return sys.__excepthook__(kind, value, tb)
    if master:
        saved, at = globals().get('last_saved'), globals().get('last_saved_iter')
        if not saved and init_from == 'resume' and 'start_iter' in globals():  # the checkpoint it resumed from
            saved, at = ckpt_path, start_iter
        where = (f"the last checkpoint is {saved} (iter {at}): continue with --init_from=resume" if saved else
                 "no checkpoint was written (the first is saved at the first evaluation after iter 0)")
        print(f"\ninterrupted at iter {globals().get('iter_num', 0)}: {where}", flush=True)
    sys.stdout.flush()
    os._exit(130)  # no teardown: the process group and DDP would wait for ranks that are gone


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
sys.excepthook = on_uncaught
if dtype == 'float16' and ep_size > 1:
    sys.exit("train.py: error: dtype=float16 with ep_size > 1 is not supported (the loss scaler's overflow check "
             "would differ between ranks): use bfloat16")
if world_size % ep_size:
    sys.exit(f"train.py: error: world size {world_size} is not divisible by ep_size={ep_size}: "
             f"run with a multiple of {ep_size} processes or change ep_size")
if gradient_accumulation_steps % world_size:
    sys.exit(f"train.py: error: gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by "
             f"the world size {world_size}")
local_accum = gradient_accumulation_steps // world_size
ep_group = expert_dp_group = None
if ddp:  # EP groups: consecutive ranks; expert data parallel groups: the ranks holding the same experts
    for g in range(world_size // ep_size):
        group = dist.new_group(list(range(g * ep_size, (g + 1) * ep_size)))
        ep_group = group if rank // ep_size == g else ep_group
    for j in range(ep_size):
        group = dist.new_group(list(range(j, world_size, ep_size)))
        expert_dp_group = group if rank % ep_size == j else expert_dp_group
device_type = 'cuda' if 'cuda' in device else 'cpu'
if dtype == 'auto':
    dtype, why = auto_dtype(device_type)
    config['dtype'] = dtype  # config.json records what runs
    if master:
        print(f"dtype auto -> {dtype}: {why}")
ptdtype = dtypes[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size


def known_peak():
    """the dense bf16/fp16 tensor-core peak FLOP/s of a known GPU, else 0 (a CPU's depends on too much to guess)"""
    if device_type != 'cuda' or ptdtype == torch.float32:
        return 0.0
    name = torch.cuda.get_device_name(device)
    peaks = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # vendor data sheets
    return next((v for k, v in peaks.items() if k in name), 0.0)


peak = peak_flops or known_peak()  # 0: MFU is not shown
if master:
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} processes, ep_size {ep_size}, device {device})")

# -----------------------------------------------------------------------------
# data

data_dir = os.path.join('data', dataset)
if not os.path.exists(os.path.join(data_dir, 'meta.json')):
    fail(f"no prepared data at {data_dir}: run python prepare.py (see README) or set --dataset")
try:
    meta = load_meta(data_dir)
    check_data(data_dir, meta, (model_args or meta)['vocab_size'])  # whole tokens, as many as meta says, all < vocab
except ValueError as e:
    fail(e)
for split in ('train', 'val'):
    if meta[f'{split}_tokens'] <= block_size:
        fail(f"the {split} split of {data_dir} has {meta[f'{split}_tokens']} tokens, fewer than block_size+1="
             f"{block_size + 1}: lower block_size or prepare more text")


def get_batch(split, batch_ids):
    """the sequences batch_ids of a split's sample table"""
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r')
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in batch_ids])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in batch_ids])
    return x.to(device), y.to(device)


def sample_offsets(split, n, generator_seed):
    """n random sequence offsets in a split, from a generator seeded by generator_seed"""
    size = meta[f'{split}_tokens']
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randint(size - block_size, (n,), generator=g).tolist()


def train_offsets(it):
    """this rank's micro-batches of iteration it: [local_accum][batch_size] offsets of the global batch"""
    offsets = sample_offsets('train', gradient_accumulation_steps * batch_size, seed * 1_000_003 + it)
    mine = offsets[rank * local_accum * batch_size:(rank + 1) * local_accum * batch_size]
    return [mine[m * batch_size:(m + 1) * batch_size] for m in range(local_accum)]

# -----------------------------------------------------------------------------
# model, optimizer, checkpoints

def is_expert(name):
    return '.experts.' in name


def full_tensor(name, t):
    """a parameter (or its optimizer state) as the whole model has it: expert shards gathered over the EP group"""
    if ep_size == 1 or not is_expert(name) or t.dim() == 0:
        return t
    parts = [torch.empty_like(t) for _ in range(ep_size)]
    dist.all_gather(parts, t.contiguous(), group=ep_group)
    return torch.cat(parts)


def local_tensor(name, t):
    """this rank's shard of a whole-model tensor"""
    if ep_size == 1 or not is_expert(name) or t.dim() == 0:
        return t
    return t.chunk(ep_size)[rank % ep_size].clone()


iter_num, best_val_loss = 0, 1e9
if ckpt is None:
    model_args = {k: config[k] for k in (f.name for f in fields(GPTConfig)) if k in config}
    model_args.update(vocab_size=meta['vocab_size'], ep_size=1)
    model_args['router_options'] = {k: config[k] for k in moe.router_settings()}  # GPTConfig keeps its router's
    tokenizer = meta.get('tokenizer')
else:  # model_args: the checkpoint's, with the training keys resolved above
    tokenizer = ckpt.get('tokenizer') or meta.get('tokenizer')
    if master and meta.get('tokenizer') != tokenizer:
        print(f"warning: dataset {dataset} was tokenized with {meta.get('tokenizer')}, the checkpoint with {tokenizer}")
    if meta['vocab_size'] > model_args['vocab_size']:
        fail(f"dataset {dataset} has a vocabulary of {meta['vocab_size']} tokens but the model in {ckpt_path} has "
             f"{model_args['vocab_size']}: prepare the data with the model's tokenizer")
    if init_from == 'resume':
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
torch.manual_seed(seed)  # the same initial model on every rank and at every ep_size
try:
    state = ckpt['model'] if ckpt else GPT(GPTConfig(**model_args)).state_dict()  # the whole model
    model = GPT(GPTConfig(**{**model_args, 'ep_size': ep_size}))  # this rank's part of it
except ValueError as e:
    fail(e)
try:
    model.load_state_dict({k: local_tensor(k, v) for k, v in state.items()})
except RuntimeError as e:  # read_checkpoint has checked the names and shapes: not expected
    raise RuntimeError(f"checkpoint {init_from} does not fit the model") from e
torch.manual_seed(seed + rank)
model.to(device)
if ep_size > 1:
    moe.set_expert_parallel(model, ep_group)
if ddp:  # balance_scope='global' sums the assignment counts over every rank (each holds other tokens)
    moe.set_balance_group(model, dist.group.WORLD)
names = {p: n for n, p in model.named_parameters()}
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, router_lr_scale)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))


def rng_state():
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if use_cuda else [])


if init_from == 'resume':
    state = optimizer.state_dict()
    order = [names[p] for g in optimizer.param_groups for p in g['params']]
    state['state'] = {i: {k: local_tensor(n, v) for k, v in ckpt['optimizer'][n].items()}
                      for i, n in enumerate(order) if n in ckpt['optimizer']}
    optimizer.load_state_dict(state)
    if ckpt.get('rng') and len(ckpt['rng']) == world_size:  # the same world: every rank continues its streams
        torch.set_rng_state(ckpt['rng'][rank][0])
        if use_cuda and len(ckpt['rng'][rank]) > 1:
            torch.cuda.set_rng_state(ckpt['rng'][rank][1])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
ckpt = state = None  # free memory
raw_model = model
total_params, active_params = model.num_params()
if master:
    print(f"parameters: {total_params / 1e6:.2f}M total, {active_params / 1e6:.2f}M active per token")
if compile:
    model = torch.compile(model)
if ddp:
    experts = [n for n, p in model.named_parameters() if is_expert(n)] if ep_size > 1 else []
    DDP._set_params_and_buffers_to_ignore_for_model(model, experts)  # expert grads are reduced by hand
    warnings.filterwarnings('ignore', '`broadcast_buffers` is deprecated')  # its replacement still syncs at init
    model = DDP(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False)  # counters are per rank


# ckpt.prev.pt is this run's previous checkpoint: a new run drops the folder's old one; a run that fell back to it
# leaves it, and the unloadable ckpt.pt is replaced
previous = 'drop' if init_from != 'resume' else 'keep' if ckpt_path == os.path.join(out_dir, 'ckpt.pt') else 'leave'
last_saved = last_saved_iter = None  # this run's latest checkpoint


def checkpoint():
    """out_dir/ckpt.pt with the whole model whatever the ep_size (rank 0 writes it)"""
    state = {n: full_tensor(n, t) for n, t in raw_model.state_dict().items()}
    opt = ({names[p]: {k: full_tensor(names[p], v) for k, v in s.items()} for p, s in optimizer.state.items()}
           if save_optimizer else None)  # save_optimizer=False: the weights only
    rng = [rng_state()] * world_size
    if ddp:
        dist.all_gather_object(rng, rng_state())
    if not master:
        return
    ckpt = dict(model=state, optimizer=opt, model_args={**asdict(raw_model.config), 'ep_size': 1},
                iter_num=iter_num, best_val_loss=best_val_loss, config=config, tokenizer=tokenizer, rng=rng,
                scaler=scaler.state_dict())
    if opt is None:
        del ckpt['optimizer']  # init_from=resume refuses such a checkpoint, saying why
    global previous, last_saved, last_saved_iter
    try:
        save_checkpoint(out_dir, ckpt, previous)
    except OSError as e:
        fail(f"cannot write a checkpoint in {out_dir} ({e}): free space or fix the folder's permissions; "
             + (f"{last_saved} (iter {last_saved_iter}) is intact" if last_saved else "no checkpoint was written yet"))
    if last_saved is None:  # this run's first checkpoint: what its size is made of
        size = os.path.getsize(os.path.join(out_dir, 'ckpt.pt'))
        opt_size = sum(t.numel() * t.element_size() for s in (opt or {}).values() for t in s.values() if torch.is_tensor(t))
        print(f"checkpoint {os.path.join(out_dir, 'ckpt.pt')}: {size / 1e6:,.1f} MB, " + (
            f"of which {opt_size / 1e6:,.1f} MB optimizer state, needed only to resume (--save_optimizer=False "
            f"saves the weights only)" if opt else "the weights only (save_optimizer=False): it cannot be resumed"))
    previous, last_saved, last_saved_iter = 'keep', os.path.join(out_dir, 'ckpt.pt'), iter_num
    if keep_checkpoints:  # a hard link: no second copy on disk
        kept = os.path.join(out_dir, f'iter_{iter_num}', 'ckpt.pt')
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        if os.path.exists(kept):
            os.remove(kept)
        os.link(os.path.join(out_dir, 'ckpt.pt'), kept)


shown = 0.0  # when the last progress line was printed


def progress(message, since):
    """rank 0, during a phase that started at time `since`: a line every progress_interval seconds"""
    global shown
    if master and time.time() - max(since, shown) >= progress_interval:
        print(f"  {message} ({time.time() - since:.0f} s)", flush=True)
        shown = time.time()


def all_reduce(t, group=None):
    if ddp:
        dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def estimate_loss():
    """mean loss over a fixed set of eval_iters batches per split, the batches split over all ranks"""
    out, started = {}, time.time()
    raw_model.eval()
    for split in ('train', 'val'):
        offsets = sample_offsets(split, eval_iters * batch_size, seed + (1 if split == 'val' else 2))
        total = torch.zeros(2, device=device)
        for b in range(rank, -(-eval_iters // world_size) * world_size, world_size):  # as many forwards on every rank
            c = min(b, eval_iters - 1)  # (expert parallelism exchanges tokens in each); the padding ones count 0
            x, y = get_batch(split, offsets[c * batch_size:(c + 1) * batch_size])
            with ctx:
                logits, _ = raw_model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # language modelling only
            total += torch.stack([loss, torch.ones((), device=device)]) * (b < eval_iters)
            progress(f"evaluating at iter {iter_num}: {split} batch {b // world_size + 1}/{-(-eval_iters // world_size)}",
                     started)
        total = all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    raw_model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def reduce_expert_grads():
    """expert grads summed over the ranks holding the same experts, scaled so the step equals one process's"""
    for n, p in raw_model.named_parameters():
        if is_expert(n) and p.grad is not None:
            all_reduce(p.grad, expert_dp_group).div_(world_size)


def clip_grad_norm(max_norm):
    """the true global gradient norm (dense grads counted once, each expert once over the EP group), clipped to
    max_norm when max_norm > 0"""
    dense, expert = torch.zeros((), device=device), torch.zeros((), device=device)
    for n, p in raw_model.named_parameters():
        if p.grad is not None:
            sq = p.grad.float().square().sum()
            if ep_size > 1 and is_expert(n):
                expert += sq
            else:
                dense += sq
    norm = (dense + (all_reduce(expert, ep_group) if ep_size > 1 else 0)).sqrt()
    if max_norm <= 0:
        return norm
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in raw_model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return norm


def log_stats(layers):
    """load CV and dropped fraction averaged over the MoE layers, and each layer's load CV and load per expert,
    from counts summed over all ranks"""
    for m in layers:
        all_reduce(m.load)
        all_reduce(m.sums)
    stats = [m.stats() for m in layers]
    for m in layers:
        m.reset_stats()
    if not stats:
        return {}
    return {**{k: sum(s[k] for s in stats) / len(stats) for k in ('load_cv', 'dropped', 'experts_per_token')},
            'layer_load_cv': [s['load_cv'] for s in stats],  # per MoE layer
            'layer_load': [s['load'] for s in stats]}  # per MoE layer, per expert: assignments since the last log


def open_log():
    """out_dir/log.jsonl: a resumed run keeps the rows up to its checkpoint (the stopped run may have logged beyond
    it); any other run starts a new file, saying so when it replaces an earlier run's"""
    path = os.path.join(out_dir, 'log.jsonl')
    if init_from != 'resume':
        if os.path.exists(path) or os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
            print(f"note: {out_dir} holds an earlier run: this one starts a new log.jsonl and replaces its ckpt.pt at "
                  f"its first checkpoint (--init_from=resume continues the earlier run instead)")
        return open(path, 'w')
    again = iter_num % eval_interval == 0 or iter_num == max_iters  # the loop evaluates iter_num once more
    kept = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short when the run was killed
            continue
        if row['iter'] < iter_num or (row['iter'] == iter_num and not ('val_loss' in row and again)):
            kept.append(line if line.endswith('\n') else line + '\n')
    with open(path + '.tmp', 'w') as f:
        f.writelines(kept)
    os.replace(path + '.tmp', path)
    return open(path, 'a')

# -----------------------------------------------------------------------------
# training loop

if master:  # the first files written: every check of the input has passed
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    log_file = open_log()
    if wandb_log:
        try:
            import wandb
        except ImportError:
            fail("wandb_log=True but wandb is not installed: pip install wandb, or set wandb_log=False")
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
start_iter = iter_num
moe_layers = raw_model.moe_layers()
bad_steps = skipped_steps = 0  # steps with a non-finite loss or gradient norm: in a row, in all
t0 = time.time()
while True:
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss()
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log_file.write(json.dumps(dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'])) + '\n')
            log_file.flush()
            if wandb_log:
                wandb.log(dict(train_loss=losses['train'], val_loss=losses['val']), step=iter_num)
        if not math.isfinite(losses['val']):  # a broken model never replaces a good checkpoint
            if master:
                print(f"warning: step {iter_num}: the val loss is {losses['val']}: no checkpoint")
        elif losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0:
                checkpoint()
        for m in moe_layers:
            m.reset_stats()
        t0 = time.time()  # tokens/s counts training only
    if iter_num == max_iters:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    moe.set_progress(raw_model, iter_num / max_iters)
    step_loss = torch.zeros(4, device=device)  # loss, balance, z, micro-steps
    step_started = time.time()
    for micro_step, batch_ids in enumerate(train_offsets(iter_num)):
        x, y = get_batch('train', batch_ids)
        if ddp:
            model.require_backward_grad_sync = micro_step == local_accum - 1
        with ctx:
            _, loss = model(x, y)
        aux = raw_model.aux
        step_loss += torch.stack([loss.detach().float(), torch.as_tensor(aux.get('balance', 0.0), device=device).float(),
                                  torch.as_tensor(aux.get('z', 0.0), device=device).float(), torch.ones((), device=device)])
        scaler.scale(loss / local_accum).backward()
        progress(f"iter {iter_num}: micro-step {micro_step + 1}/{local_accum} of this rank done", step_started)
    if ep_size > 1:
        reduce_expert_grads()
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(grad_clip)
    # a non-finite loss or gradient norm on any rank: skip the step (float16's loss scaler skips its overflows itself)
    bad = ~torch.isfinite(step_loss[0]) | (~torch.isfinite(grad_norm) & (not scaler.is_enabled()))
    if all_reduce(bad.float()).item():  # one host sync per step
        bad_steps, skipped_steps = bad_steps + 1, skipped_steps + 1
        scaler.update()  # (float16: lowers the scale)
    else:
        bad_steps = 0
        scaler.step(optimizer)
        scaler.update()
    moe.end_step(raw_model, update=not bad_steps)  # DeepSeek-V3's bias, ReMoE's L1 coefficient; counts reset
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if bad_steps:
        loss_now, norm_now = step_loss[0].item(), grad_norm.item()
        if master:
            print(f"warning: iter {iter_num}: non-finite loss {loss_now} or gradient norm {norm_now}: step skipped "
                  f"({bad_steps} in a row, {skipped_steps} in this run; max_bad_steps={max_bad_steps})")
            log_file.write(json.dumps(dict(iter=iter_num, skipped=True, loss=str(loss_now), grad_norm=str(norm_now),
                                           bad_steps=bad_steps, skipped_steps=skipped_steps)) + '\n')
            log_file.flush()
        if bad_steps >= max_bad_steps:
            if ddp:
                dist.destroy_process_group()
            fail(f"{bad_steps} steps in a row (to iter {iter_num}) had a non-finite loss or gradient norm, training "
                 f"stops: lower learning_rate (lr was {lr:.2e}), raise warmup_iters or set grad_clip; "
                 + (f"{last_saved} (iter {last_saved_iter}) is intact" if last_saved else "no checkpoint was written"))

    if iter_num % log_interval == 0:
        loss_sum, balance, z, n = all_reduce(step_loss).tolist()  # mean over all micro-steps of all ranks
        stats = log_stats(moe_layers)
        dt = time.time() - t0
        t0 = time.time()
        if master:
            row = dict(iter=iter_num, loss=loss_sum / n, aux_loss=balance / n, z_loss=z / n, lr=lr,
                       tokens_per_s=tokens_per_iter * log_interval / dt, **stats)
            if peak:  # MFU only against a known peak
                row['mfu'] = raw_model.estimate_mfu(batch_size * local_accum * log_interval, block_size, dt, peak)
            print(f"iter {iter_num}: loss {row['loss']:.4f}, aux {row['aux_loss']:.4f}, z {row['z_loss']:.4f}, "
                  f"lr {lr:.2e}, {row['tokens_per_s']:,.0f} tok/s" + (f", mfu {row['mfu'] * 100:.2f}%" if peak else '')
                  + (f", load cv {stats['load_cv']:.3f}, dropped {stats['dropped']:.3f}, "
                     f"experts/token {stats['experts_per_token']:.2f}" if stats else ''))
            log_file.write(json.dumps(row) + '\n')
            log_file.flush()
            if wandb_log:  # scalars; the per-layer lists as one value per layer
                wandb.log({k: v for k, v in row.items() if not isinstance(v, list)}
                          | {f'load_cv/layer{j}': v for j, v in enumerate(row.get('layer_load_cv', []))}, step=iter_num)

if ddp:
    dist.destroy_process_group()
