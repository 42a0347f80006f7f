# Qwen2-MoE: softmax top-k without renormalisation, plus one shared expert whose output is scaled by
# sigmoid(w . x), a learned per-token gate
router = 'softmax'
router_renorm = False
n_shared_experts = 1
shared_gate = True
out_dir = 'out/shared_gate'
