# shared expert + sigmoid top-1 router (LibMoE SharedE-V3): 2 experts active per token
router = 'sigmoid'
n_shared_experts = 1
top_k = 1
out_dir = 'out/shared_sigmoid'
