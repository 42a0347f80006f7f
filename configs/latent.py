# Latent experts (Megatron-core moe_latent_size; Nemotron's latent MoE): the routed experts work
# in n_embd / 4, the tokens projected down once before dispatch and the weighted sum up once after
# the combine; the router and the shared expert see the full hidden state. Goes after a router
# (python train.py configs/softmax.py configs/latent.py) or alone with the default router below
router = 'softmax'
top_k = 2
n_shared_experts = 1
moe_latent_size = 8
out_dir = 'out/latent'
