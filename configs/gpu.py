# size preset for one or more GPUs: GPT-2 small shape on GPT-2 BPE text, e.g.
# python prepare.py --input ../shared/data/gutenberg --tokenizer gpt2    (-> data/gutenberg_gpt2)
# torchrun --standalone --nproc_per_node=8 train.py configs/sigmoid.py configs/gpu.py
dataset = 'gutenberg_gpt2'
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32  # 524,288 tokens per step
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 5000
warmup_iters = 200
eval_interval = 250
eval_iters = 100
dtype = 'bfloat16'
compile = True
