# shared expert + softmax top-1 router (DeepSeekMoE; LibMoE SharedE-V2): 2 experts active per token.
# LibMoE upcycles with shared_scale = routed_scale = 0.5, which keeps the dense function; from
# scratch 1 / 1.
router = 'softmax'
n_shared_experts = 1
top_k = 1
out_dir = 'out/shared_softmax'
