"""
Train a GPT with (or without) Mixture-of-Experts layers, nanoGPT's train.py for MoE. One process:
$ python train.py configs/sigmoid.py
DDP on one node (gloo on CPU, nccl on GPU):
$ torchrun --standalone --nproc_per_node=2 train.py configs/sigmoid.py
Expert parallelism, each rank holding n_experts / ep_size of the experts:
$ torchrun --standalone --nproc_per_node=2 train.py configs/sigmoid.py --ep_size=2
Parameters, gradients and AdamW state sharded over the ranks (FSDP2, fsdp.py), with or without EP:
$ torchrun --standalone --nproc_per_node=2 train.py configs/sigmoid.py --parallel=fsdp

- Every setting is listed below with its default; config files (run left to right) and --key=value
  change them (cli.parse). The model's are GPTConfig's fields and the routers' options and knobs:
  tests/test_settings.py fails when this list misses one or a router's default differs.
- The default data set is prepared on first use from the copy of tiny Shakespeare in assets/ (as
  `python prepare.py` does), so a fresh clone trains with no other step.
- Batches come from a generator seeded by (seed, iteration): a step's tokens depend on the seed and
  the global batch only, so 1 and N processes train on the same tokens and a resumed run continues
  exactly (the iteration is the data position; tests/test_train.py, tests/test_ep.py).
- init_from=resume continues a run as it was: each setting not given is the checkpoint's, but this
  machine's. A run from a checkpoint takes its architecture and refuses a setting contradicting it;
  a training knob (model.knobs()) may change (docs/training.md: resume rules).
- A non-finite loss or gradient norm skips the step whole; max_bad_steps in a row stop the run, the
  last checkpoint intact; Ctrl-C prints where that checkpoint is (tests/test_faults.py).
"""
import atexit
import json
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fsdp
import moe
from checkpoint import CKPT, open_log, resume, save_run, save_shards
from cli import (DTYPES, autocast, fail, gpu_peak, on_interrupt, parse, pick_device, pick_dtype,
                 settings_of)
from model import GPT, GPTConfig
from model import limits as model_limits
from model import settings as model_settings
from prepare import DEFAULT_DATASET, prepare_default, training_data

# -----------------------------------------------------------------------------
# settings and their defaults
# I/O
out_dir = 'out'
eval_interval = 100  # evaluate (and maybe checkpoint) every this many iterations
log_interval = 10
progress_interval = 10.0  # seconds: a slow phase (an evaluation, a long step) shows progress this often
eval_iters = 20  # validation batches per evaluation (a fixed set, split over the ranks)
always_save_checkpoint = False  # save at every evaluation, not only when val loss improves
keep_checkpoints = False  # also keep each checkpoint as out_dir/iter_N/ckpt.pt (eval.py --checkpoints)
save_optimizer = True  # False: the weights only (a third of the size), enough for all but resume
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir) or a checkpoint folder (e.g. upcycle.py's)
# routing trace: every MoE layer's routing of the first N training iterations, to
# out_dir/routing_trace_rank{r}.pt (moe.save_trace), with each router's probabilities if asked
routing_trace = 0
routing_trace_scores = False
# a folder whose routing_trace_rank{r}.pt the training forwards replay (its ids, this router's
# weights for them), forward by forward
routing_replay = ''
wandb_log = False  # also log to Weights & Biases (pip install wandb; imported only when on)
wandb_project = 'nanomoe'
wandb_run_name = 'run'
# data
dataset = 'shakespeare_char'  # data/<dataset>/ from prepare.py (this one made here when missing)
gradient_accumulation_steps = 2  # micro-batches per step over all ranks (divided over the ranks)
batch_size = 16  # sequences per micro-batch
# step it trains on the batch of iteration data_start + it: a run continued from another run's
# checkpoint folder passes the iteration that run reached, and sees the tokens that come after it
data_start = 0
block_size = 128
# model: GPTConfig's fields (model.py) with a small model's defaults; vocab_size comes from the data
arch = 'gpt2'  # 'gpt2' or 'llama'
n_layer = 4
n_head = 4
n_kv_head = 0  # llama grouped-query attention (0 = n_head)
n_embd = 128
mlp_hidden = 0  # dense MLP hidden size (0 = 4 * n_embd)
dropout = 0.0
bias = False
qkv_bias = False  # biases on q, k, v only (Qwen2-MoE)
head_dim = 0  # attention head width (0 = n_embd / n_head)
rotary_dim = 0  # the first dims of each head that rotary rotates (0 = all; GLM-4.5: half)
qk_norm = 'none'  # RMSNorm of q and k: 'none', 'full' (all heads together, OLMoE) or 'head' (Qwen3)
attn_scale = 0.0  # attention scale (0 = head_dim ** -0.5; Granite's attention_multiplier)
embed_scale = 1.0  # factor of the embeddings (Granite's embedding_multiplier)
residual_scale = 1.0  # factor of each residual branch (Granite's residual_multiplier)
logit_divisor = 1.0  # the logits are divided by it (Granite's logits_scaling)
tie_embeddings = True
rope_theta = 10000.0
norm_eps = 1e-05
# MoE
router = 'dense'  # 'dense' (no MoE) or one of moe.ROUTERS
n_experts = 8
top_k = 2
moe_every = 1  # every n-th layer is MoE (2 = every other layer)
moe_first_dense = 0  # the first N layers stay dense
dense_layers = ''  # layers that stay dense whatever the rule, e.g. '0,3' (Qwen2-MoE)
expert_hidden = 0  # expert hidden size (0 = mlp_hidden); smaller for fine-grained experts
moe_latent_size = 0  # the routed experts' width (0 = n_embd; Megatron's latent MoE)
n_shared_experts = 0  # always-on shared experts (DeepSeekMoE)
shared_hidden = 0  # the shared experts' width together (0 = n_shared_experts * expert_hidden)
shared_scale = 1.0  # weight of the shared experts' output
routed_scale = 1.0  # weight of the routed experts' output (DeepSeek-V3: 2.5)
router_renorm = True  # divide the top-k weights by their sum
capacity_factor = 0.0  # 0 = dropless; else each expert takes ceil(cf * k * T / E) assignments
eval_capacity_factor = 0.0  # capacity at evaluation (0 = dropless: eval-time drops inflate the loss)
aux_loss_coef = 0.01  # balance loss coefficient
z_loss_coef = 0.001  # router z-loss coefficient
balance_scope = 'batch'  # the balance loss over a 'batch', 'sequence' or 'global' (the step, all ranks)
force_balance = False  # benchmarking only: balanced round-robin routing in place of the router's
shared_gate = False  # Qwen2-MoE: sigmoid(w . x) scales the shared experts' output
# each router's own options and knobs (moe.py), defaults as there
router_jitter = 0.01  # switch: multiplicative input jitter in training
cosine_variant = 'xmoe'  # cosine: 'xmoe' (projected, tau) or 'libmoe' (LibMoE v1.1 Cosine-R)
router_dim = 0  # cosine, xmoe: the routing space (0 = E/2, as LibMoE)
router_temperature = 0.3  # cosine, xmoe: tau
cosine_theta = 0.1  # perturbed cosine: theta added to both norms
hyper_k_schedule = True  # hyper: k grows from hyper_k_min to top_k over training
hyper_k_min = 1  # hyper: the schedule's first k
n_group = 1  # deepseek: expert groups of group-limited top-k
topk_group = 1  # deepseek: the groups a token may use
bias_update_rate = 0.001  # deepseek: the expert bias step u (0 freezes the bias)
bias_recentre = False  # deepseek: the step's bias increment re-centred to mean 0 (torchtitan)
score_function = 'sigmoid'  # deepseek: 'sigmoid' (V3) or 'sqrtsoftplus' (V4)
qb_score_function = 'softmax'  # quantile: the weights' 'softmax', 'sigmoid' or 'sqrtsoftplus'
qb_ema = 0.0  # quantile: beta's EMA factor (0 = the step's estimate)
null_reward = 1e-05  # tcmoe: reward for routing to a null slot (skipping compute)
moepp_gate_residual = True  # moepp: logits + W_r (the previous MoE layer's logits)
moepp_tau = 0.75  # moepp: balance-loss factor of the zero / copy / constant experts
remoe_l1_init = 1e-08  # remoe: the L1 coefficient at the start
remoe_l1_alpha = 1.2  # remoe: the coefficient's multiplicative step toward sparsity 1 - top_k/E
topp_threshold = 0.4  # topp: cumulative probability at which a token stops taking experts
topp_max = 0  # topp: most experts per token (0 = n_experts)
topp_entropy_coef = 0.0001  # topp: weight of the dynamic (entropy) loss
ec_capacity_factor = 1.0  # expert_choice: an expert takes ec_capacity_factor * T * top_k / E tokens
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
# 'auto' (bf16 where the hardware runs it fast, else float32), 'float32', 'bfloat16', 'float16'
dtype = 'auto'
compile = False  # torch.compile the model
seed = 1337
deterministic = False  # deterministic kernels (GPU runs repeat bit for bit, somewhat slower)
max_bad_steps = 5  # stop after this many steps in a row with a non-finite loss or gradient norm
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = cli.GPU_PEAKS (A100/H100/H200, bf16/fp16)
expert_impl = 'auto'  # 'grouped' (one F.grouped_mm), 'loop' (a matmul per expert), or 'auto'
ep_size = 1  # expert parallelism: ranks that share one set of experts
# several processes: 'ddp' (every rank holds the whole model) or 'fsdp' (parameters, gradients and
# AdamW state sharded over the ranks, torch's FSDP2, composed with ep_size: fsdp.py)
parallel = 'ddp'
activation_checkpointing = 'none'  # 'block': each block's activations recomputed in the backward
save_sharded = False  # fsdp: each rank saves its own shards to out_dir/ckpt_shards/ (no gather)
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(__file__)
# a router added to moe.py but not listed above still gets its settings, with moe.py's defaults
DEFAULTS |= {k: v for k, v in moe.router_settings().items() if k not in DEFAULTS}
# the allowed values of the settings above that are not the model's (cli.problem); the model's are
# declared with GPTConfig's fields and the routers' settings (model.limits())
LIMITS = dict(
    out_dir='writable', eval_interval='>= 1', log_interval='>= 1', progress_interval='>= 0',
    eval_iters='>= 1', data_start='>= 0', init_from='text', wandb_project='text',
    wandb_run_name='text',
    dataset='text', gradient_accumulation_steps='>= 1', batch_size='>= 1', learning_rate='> 0',
    max_iters='>= 0', weight_decay='>= 0', beta1='[0, 1)', beta2='[0, 1)', grad_clip='>= 0',
    router_lr_scale='>= 0', warmup_iters='>= 0', lr_decay_iters='>= 0', min_lr='>= 0',
    device='text', dtype='dtype', seed='[0, 4294967296)', max_bad_steps='>= 1', peak_flops='>= 0',
    routing_trace='>= 0', routing_replay='text', parallel=('ddp', 'fsdp'),
)
# this machine's settings: resume never takes them from the checkpoint
MACHINE = ('init_from', 'out_dir', 'device', 'compile', 'parallel', 'save_sharded',
           *model_settings('system'))


def config_problem(c):
    """what the ranges of single settings (LIMITS, checked by cli.parse) do not catch, as one
    line"""
    if c['min_lr'] > c['learning_rate']:
        return (f"min_lr={c['min_lr']} is above learning_rate={c['learning_rate']}: "
                f"set --min_lr (e.g. learning_rate / 10)")
    return None


try:
    # given: key -> where it was set
    config, given = parse(DEFAULTS, sys.argv[1:], limits={**model_limits(), **LIMITS})
except ValueError as e:
    fail(e)
ckpt = ckpt_path = model_args = None
if config['init_from'] != 'scratch':
    try:
        config, ckpt, ckpt_path, model_args, note = resume(config, given, MACHINE)
    except ValueError as e:
        fail(e)
    if note and int(os.environ.get('RANK', 0)) == 0:
        print(note)
problem = config_problem(config)
if problem:
    fail(problem)
globals().update(config)
lr_decay_iters = lr_decay_iters or max_iters
if deterministic:
    # cuBLAS needs a fixed workspace for it, set before its first use
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)

# -----------------------------------------------------------------------------
# processes, groups, device and dtype
try:
    device_name = pick_device(device)
except ValueError as e:
    fail(e)
use_cuda = device_name.startswith('cuda')
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    local_rank = int(os.environ['LOCAL_RANK'])
    device_name = f'cuda:{local_rank}' if use_cuda else 'cpu'
    if use_cuda:
        # the device first: NCCL binds its communicator to device_id at once
        torch.cuda.set_device(device_name)
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo',
                            device_id=torch.device(device_name) if use_cuda else None)
    rank, world_size = dist.get_rank(), dist.get_world_size()
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
# the loop's iteration and the last checkpoint (the one resumed from, then this run's)
status = dict(iter=0, checkpoint=None, checkpoint_iter=None)


def interrupted():
    """Ctrl-C's one line (rank 0): where the last checkpoint is"""
    if not master:
        return
    where = "no checkpoint was written (the first is saved at the first evaluation after iter 0)"
    if status['checkpoint']:
        where = (f"the last checkpoint is {status['checkpoint']} "
                 f"(iter {status['checkpoint_iter']}): continue with --init_from=resume")
    print(f"\ninterrupted at iter {status['iter']}: {where}", flush=True)


on_interrupt(interrupted)
if dtype == 'float16' and (ep_size > 1 or parallel == 'fsdp'):
    fail(f"dtype=float16 with {'ep_size > 1' if ep_size > 1 else 'parallel=fsdp'} is not supported "
         f"(the loss scaler's overflow check would differ between ranks): use bfloat16")
# FSDP: one process is a layout of one (nothing to shard)
sharded = ddp and parallel == 'fsdp'
if save_sharded and not sharded:
    fail("save_sharded=True saves each rank's FSDP shards: run several processes with "
         "--parallel=fsdp, or drop save_sharded")
if world_size % ep_size:
    fail(f"world size {world_size} is not divisible by ep_size={ep_size}: "
         f"run with a multiple of {ep_size} processes or change ep_size")
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by "
         f"the world size {world_size}")
local_accum = gradient_accumulation_steps // world_size
device_type = 'cuda' if use_cuda else 'cpu'
if sharded:
    dense_mesh, expert_mesh, ep_group, expert_dp_group = fsdp.meshes(device_type, world_size,
                                                                     ep_size)
else:
    ep_group, expert_dp_group = moe.expert_groups(ep_size) if ddp else (None, None)
dtype_name, why = pick_dtype(dtype, device_type)
config['dtype'] = dtype_name  # config.json records what runs
if why and master:
    print(f"dtype auto -> {dtype_name}: {why}")
ctx = autocast(device_type, dtype_name)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
# MFU against peak_flops, else the dense bf16/fp16 peak of a known GPU model (cli.GPU_PEAKS)
gpu = torch.cuda.get_device_name(device_name) if use_cuda and dtype_name != 'float32' else ''
peak = peak_flops or gpu_peak(gpu)
if master:
    layout = f", {parallel}" if ddp else ''
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} processes, ep_size {ep_size}"
          f"{layout}, device {device_name})")

# -----------------------------------------------------------------------------
# data
data_dir = os.path.join('data', dataset)
if dataset == DEFAULT_DATASET:
    # a fresh clone: rank 0 prepares the default data set, the other ranks wait for it
    if master and not os.path.exists(os.path.join(data_dir, 'meta.json')):
        print(f"no prepared data at {data_dir}: preparing it from the tiny Shakespeare in assets/ "
              f"(as python prepare.py does)", flush=True)
        prepare_default()
    if ddp:
        dist.barrier()
try:
    meta = training_data(data_dir, model_args and model_args['vocab_size'], block_size)
except ValueError as e:
    fail(e)


def get_batch(split, batch_ids):
    """the sequences batch_ids of a split's sample table -> x, y (B, block_size)"""
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'], mode='r')
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in batch_ids])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64))
                     for i in batch_ids])
    if use_cuda:
        # pinned pages: the copy runs asynchronously, no host sync per micro-batch
        return (x.pin_memory().to(device_name, non_blocking=True),
                y.pin_memory().to(device_name, non_blocking=True))
    return x, y


def sample_offsets(split, n, generator_seed):
    """n random sequence offsets in a split, from a generator seeded by generator_seed"""
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randint(meta[f'{split}_tokens'] - block_size, (n,), generator=g).tolist()


def train_offsets(it):
    """this rank's micro-batches of iteration it: [local_accum][batch_size] offsets in the global
    batch"""
    n = gradient_accumulation_steps * batch_size
    offsets = sample_offsets('train', n, seed * 1_000_003 + data_start + it)
    mine = offsets[rank * local_accum * batch_size:(rank + 1) * local_accum * batch_size]
    return [mine[m * batch_size:(m + 1) * batch_size] for m in range(local_accum)]


# -----------------------------------------------------------------------------
# model and optimizer
iter_num, best_val_loss = 0, 1e9
if ckpt is None:
    model_args = {k: config[k] for k in model_settings() if k in config}
    model_args.update(vocab_size=meta['vocab_size'], ep_size=1)
    # every router's settings: GPTConfig keeps its router's
    model_args['router_options'] = {k: config[k] for k in moe.router_settings()}
    tokenizer = meta.get('tokenizer')
else:
    # the checkpoint's model_args with the knobs given; how the experts run is this run's
    model_args['expert_impl'] = expert_impl
    tokenizer = ckpt.get('tokenizer') or meta.get('tokenizer')
    if master and meta.get('tokenizer') != tokenizer:
        print(f"warning: dataset {dataset} was tokenized with {meta.get('tokenizer')}, "
              f"the checkpoint with {tokenizer}")
    if meta['vocab_size'] > model_args['vocab_size']:
        fail(f"dataset {dataset} has a vocabulary of {meta['vocab_size']} tokens but the model in "
             f"{ckpt_path} has {model_args['vocab_size']}: "
             f"prepare the data with the model's tokenizer")
    if init_from == 'resume':
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        status.update(iter=iter_num, checkpoint=ckpt_path, checkpoint_iter=iter_num)
torch.manual_seed(seed)  # the same initial model on every rank and at every ep_size
try:
    state = ckpt['model'] if ckpt else GPT(GPTConfig(**model_args)).state_dict()  # the whole model
    model = GPT(GPTConfig(**{**model_args, 'ep_size': ep_size}))  # this rank's part of it
except ValueError as e:
    fail(e)
# read_checkpoint has checked the names and shapes: a mismatch here is a bug
model.load_state_dict({k: moe.local_tensor(k, v, ep_size, rank) for k, v in state.items()})
torch.manual_seed(seed + rank)
if ep_size > 1:
    moe.set_expert_parallel(model, ep_group)
if ddp:
    # balance_scope='global' sums the assignment counts over every rank (each holds other tokens)
    moe.set_balance_group(model, dist.group.WORLD)
# FSDP moves each rank's shards to the device (the whole model never is there)
if sharded:
    model = fsdp.shard(model, dense_mesh, expert_mesh, compute_dtype=DTYPES[dtype_name])
else:
    model.to(device_name)
names = {p: n for n, p in model.named_parameters()}
params = {n: p for p, n in names.items()}
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                       router_lr_scale)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype_name == 'float16'))


def rng_state():
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state()] if use_cuda else [])]


if init_from == 'resume':
    state = optimizer.state_dict()
    order = [names[p] for g in optimizer.param_groups for p in g['params']]
    state['state'] = {i: {k: fsdp.part(n, v, params[n], ep_size, rank)
                          for k, v in ckpt['optimizer'][n].items()}
                      for i, n in enumerate(order) if n in ckpt['optimizer']}
    optimizer.load_state_dict(state)
    # the same world: every rank continues its random streams
    if ckpt.get('rng') and len(ckpt['rng']) == world_size:
        torch.set_rng_state(ckpt['rng'][rank][0])
        if use_cuda and len(ckpt['rng'][rank]) > 1:
            torch.cuda.set_rng_state(ckpt['rng'][rank][1])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
ckpt = state = None  # free memory
raw_model = model
total_params, active_params = model.num_params()
if master:
    print(f"parameters: {total_params / 1e6:.2f}M total, "
          f"{active_params / 1e6:.2f}M active per token")
for m in raw_model.moe_layers()[:1]:
    # the experts' path on this device and dtype, and why (the same in every MoE layer)
    try:
        grouped, why = m.experts.path(torch.device(device_name), DTYPES[dtype_name])
    except ValueError as e:
        fail(e)
    if master:
        print(f"experts: {'grouped_mm' if grouped else 'loop'} ({why})")
if compile:
    model = torch.compile(model)
if ddp and not sharded:
    experts = [n for n, p in model.named_parameters() if moe.is_expert(n)] if ep_size > 1 else []
    # expert grads are reduced by hand
    DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
    # its replacement still syncs the buffers at init
    warnings.filterwarnings('ignore', '`broadcast_buffers` is deprecated')
    # the routing counters are per rank
    model = DDP(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False)

# -----------------------------------------------------------------------------
# checkpoints, evaluation, gradients, statistics
# ckpt.prev.pt is this run's previous checkpoint: a new run drops the folder's old one; a run that
# fell back to it leaves it (and the unloadable ckpt.pt is replaced)
first_previous = {None: 'drop', os.path.join(out_dir, CKPT): 'keep'}
first_previous = first_previous.get(status['checkpoint'], 'leave')
saves = 0  # checkpoints this run wrote


def intact(otherwise):
    """where the last good checkpoint is, for an error line"""
    if status['checkpoint']:
        return f"{status['checkpoint']} (iter {status['checkpoint_iter']}) is intact"
    return otherwise


def saved(name, t):
    """what a checkpoint keeps of a tensor: the whole model's, on rank 0's CPU (every rank takes
    part in the gathers), or with save_sharded this rank's block (fsdp.shard_entry)"""
    if save_sharded:
        return fsdp.shard_entry(name, t, ep_size, rank)
    t = fsdp.whole(name, t, ep_size, ep_group)
    return t.cpu() if master else None


def save():
    """out_dir/ckpt.pt with the whole model whatever the layout (rank 0 writes it); with
    save_sharded each rank's blocks to out_dir/ckpt_shards/ instead"""
    global saves
    state = {n: saved(n, t) for n, t in raw_model.state_dict().items()}
    opt = {names[p]: {k: saved(names[p], v) for k, v in s.items()}
           for p, s in optimizer.state.items() if save_optimizer}
    rng = [rng_state()] * world_size
    if ddp:
        dist.all_gather_object(rng, rng_state())
    ckpt = dict(model=state, optimizer=opt, model_args={**asdict(raw_model.config), 'ep_size': 1},
                iter_num=iter_num, best_val_loss=best_val_loss, config=config, tokenizer=tokenizer,
                rng=rng, scaler=scaler.state_dict())
    if not save_optimizer:
        del ckpt['optimizer']  # init_from=resume refuses such a checkpoint, saying why
    try:
        if save_sharded:
            path = save_shards(out_dir, ckpt, rank, dist.barrier)
        elif master:
            path = save_run(out_dir, ckpt, 'keep' if saves else first_previous, first=not saves,
                            keep_copy=keep_checkpoints)
        else:
            return
    except OSError as e:
        fail(f"cannot write a checkpoint in {out_dir} ({e}): free space on its disk, or set "
             f"--out_dir to a folder on another disk (or fix its permissions); "
             + intact("no checkpoint was written yet"))
    saves += 1
    status.update(checkpoint=path, checkpoint_iter=iter_num)


shown = 0.0  # when the last progress line was printed


def progress(message, since):
    """rank 0, in a phase that started at time `since`: a line every progress_interval seconds"""
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
    """mean loss over a fixed set of eval_iters batches per split, the batches split over the ranks"""
    out, started = {}, time.time()
    # forwards per rank: as many on every rank (expert parallelism exchanges tokens in each)
    n = -(-eval_iters // world_size)
    raw_model.eval()
    for split in ('train', 'val'):
        split_seed = seed + (1 if split == 'val' else 2)
        offsets = sample_offsets(split, eval_iters * batch_size, split_seed)
        total = torch.zeros(2, device=device_name)  # loss sum, batches
        for b in range(rank, n * world_size, world_size):
            c = min(b, eval_iters - 1)  # the padding forwards count 0
            x, y = get_batch(split, offsets[c * batch_size:(c + 1) * batch_size])
            with ctx:
                logits, _ = raw_model(x)
            # language modelling only
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            total += torch.stack([loss, torch.ones((), device=device_name)]) * (b < eval_iters)
            done = f"{split} batch {b // world_size + 1}/{n}"
            progress(f"evaluating at iter {iter_num}: {done}", started)
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


# -----------------------------------------------------------------------------
# training loop
if master:
    # the first files written: every check of the input has passed
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    # a resumed run evaluates its first iteration again when it is on the schedule
    again = iter_num % eval_interval == 0 or iter_num == max_iters
    log_file = open_log(out_dir, iter_num if init_from == 'resume' else None, again)
    if wandb_log:
        try:
            import wandb
        except ImportError:
            fail("wandb_log=True but wandb is not installed: "
                 "pip install wandb, or set wandb_log=False")
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)


def log(row):
    log_file.write(json.dumps(row) + '\n')
    log_file.flush()


moe_layers = raw_model.moe_layers()
# the training forwards' routing trace and replay (moe.routing); evaluations take neither
trace = [[] for _ in moe_layers] if routing_trace else None
replay = None
if routing_replay:
    replay_path = os.path.join(routing_replay, f'routing_trace_rank{rank}.pt')
    if not os.path.isfile(replay_path):
        fail(f"routing_replay={routing_replay!r} has no {os.path.basename(replay_path)}: give the "
             f"out_dir of a run with routing_trace > 0 on as many processes")
    replay = moe.load_trace(replay_path)
tracing = ExitStack()
# closed on every exit (an error's too), so the layers are restored before the interpreter ends
atexit.register(tracing.close)
if trace is not None or replay is not None:
    try:
        tracing.enter_context(moe.routing(raw_model, trace=trace, replay=replay,
                                          scores=routing_trace_scores))
    except ValueError as e:
        fail(e)


def save_trace():
    """the trace so far to out_dir; tracing stops"""
    tracing.close()
    moe.save_trace(os.path.join(out_dir, f'routing_trace_rank{rank}.pt'), trace)


bad_steps = skipped_steps = 0  # steps with a non-finite loss or gradient norm: in a row, in all
t0 = time.time()
while True:
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        with moe.routing(raw_model):
            losses = estimate_loss()
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, "
                  f"val loss {losses['val']:.4f}")
            log(dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val']))
            if wandb_log:
                wandb.log(dict(train_loss=losses['train'], val_loss=losses['val']), step=iter_num)
        if not math.isfinite(losses['val']):
            # a broken model never replaces a good checkpoint
            if master:
                print(f"warning: step {iter_num}: the val loss is {losses['val']}: no checkpoint")
        elif losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > 0:
                save()
        for m in moe_layers:
            m.reset_stats()
        t0 = time.time()  # tokens/s counts training only
    if iter_num == max_iters:
        break

    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    moe.set_progress(raw_model, iter_num / max_iters)
    step_loss = torch.zeros(4, device=device_name)  # loss, balance, z, micro-steps
    step_started = time.time()
    for micro_step, batch_ids in enumerate(train_offsets(iter_num)):
        x, y = get_batch('train', batch_ids)
        if ddp and not sharded:
            model.require_backward_grad_sync = micro_step == local_accum - 1
        with ctx:
            _, loss, aux = model(x, y, with_aux=True)
        # aux: {} for a dense model
        balance_z = [torch.as_tensor(aux.get(k, 0.0), device=device_name) for k in ('balance', 'z')]
        parts = [loss.detach(), *balance_z, torch.ones((), device=device_name)]
        step_loss += torch.stack([p.float() for p in parts])
        scaler.scale(loss / local_accum).backward()
        done = f"micro-step {micro_step + 1}/{local_accum} of this rank done"
        progress(f"iter {iter_num}: {done}", step_started)
    scaler.unscale_(optimizer)
    grad_norm = moe.clip_grad_norm(raw_model, grad_clip, ep_size, ep_group, expert_dp_group,
                                   sharded=sharded)
    # a non-finite loss or gradient norm on any rank: skip the step
    # (float16's loss scaler skips its own overflows)
    bad = ~torch.isfinite(step_loss[0]) | (~torch.isfinite(grad_norm) & (not scaler.is_enabled()))
    if all_reduce(bad.float()).item():  # one host sync per step
        bad_steps, skipped_steps = bad_steps + 1, skipped_steps + 1
        scaler.update()  # (float16: lowers the scale)
    else:
        bad_steps = 0
        scaler.step(optimizer)
        scaler.update()
    # DeepSeek-V3's bias, ReMoE's L1 coefficient; the step's counts reset
    moe.end_step(raw_model, update=not bad_steps)
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    status['iter'] = iter_num
    if trace is not None and iter_num == routing_trace:
        save_trace()
        trace = None
    if bad_steps:
        loss_now, norm_now = step_loss[0].item(), grad_norm.item()
        if master:
            print(f"warning: iter {iter_num}: non-finite loss {loss_now} or gradient norm {norm_now}: "
                  f"step skipped ({bad_steps} in a row, {skipped_steps} in this run; "
                  f"max_bad_steps={max_bad_steps})")
            log(dict(iter=iter_num, skipped=True, loss=str(loss_now), grad_norm=str(norm_now),
                     bad_steps=bad_steps, skipped_steps=skipped_steps))
        if bad_steps >= max_bad_steps:
            if ddp:
                dist.destroy_process_group()
            fail(f"{bad_steps} steps in a row (to iter {iter_num}) had a non-finite loss or gradient "
                 f"norm, training stops: lower learning_rate (lr was {lr:.2e}), raise warmup_iters or "
                 f"set grad_clip; " + intact("no checkpoint was written"))

    if iter_num % log_interval == 0:
        # sums over all micro-steps of all ranks
        loss_sum, balance, z, n = all_reduce(step_loss).tolist()
        stats = moe.log_stats(moe_layers)
        dt = time.time() - t0
        t0 = time.time()
        if master:
            row = dict(iter=iter_num, loss=loss_sum / n, aux_loss=balance / n, z_loss=z / n, lr=lr,
                       tokens_per_s=tokens_per_iter * log_interval / dt, **stats)
            line = (f"iter {iter_num}: loss {row['loss']:.4f}, aux {row['aux_loss']:.4f}, "
                    f"z {row['z_loss']:.4f}, lr {lr:.2e}, {row['tokens_per_s']:,.0f} tok/s")
            if peak:
                # MFU only against a known peak
                sequences = batch_size * local_accum * log_interval
                row['mfu'] = raw_model.estimate_mfu(sequences, block_size, dt, peak)
                line += f", mfu {row['mfu'] * 100:.2f}%"
            if stats:
                line += (f", load cv {stats['load_cv']:.3f}, dropped {stats['dropped']:.3f}, "
                         f"experts/token {stats['experts_per_token']:.2f}")
            print(line)
            log(row)
            if wandb_log:
                # scalars; the per-layer lists as one value per layer
                scalars = {k: v for k, v in row.items() if not isinstance(v, list)}
                layer_cv = enumerate(row.get('layer_load_cv', []))
                layers = {f'load_cv/layer{j}': v for j, v in layer_cv}
                wandb.log(scalars | layers, step=iter_num)

if trace is not None:
    # a run shorter than routing_trace: what it recorded
    save_trace()
if ddp:
    dist.destroy_process_group()
