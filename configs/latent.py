# Latent experts (Megatron-core moe_latent_size; Nemotron's latent MoE): the routed experts work
# in n_embd / 4 (n_embd as set before this file), the tokens projected down once before dispatch
# and the weighted sum up once after the combine; the router and the shared experts see the full
# hidden state. After a router it keeps that router (python train.py configs/sigmoid.py
# configs/latent.py); alone, softmax top-2 with one shared expert
if router == 'dense':
    router = 'softmax'
    top_k = 2
    n_shared_experts = 1
moe_latent_size = n_embd // 4
out_dir = 'out/latent'
