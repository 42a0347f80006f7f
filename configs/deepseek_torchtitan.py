# DeepSeek-V3 routing as torchtitan trains it (models/common/moe.py, components/optimizer/
# optimizer.py): sigmoid scores, top-k of s + b, weights the unbiased s without renormalisation
# (route_norm=False, route_scale=1.0), and after each optimizer step the sign step u = 1e-3
# (load_balance_coeff) re-centred to mean 0; no balance loss, one shared expert
router = 'deepseek'
n_shared_experts = 1
top_k = 2
router_renorm = False
aux_loss_coef = 0.0
bias_update_rate = 1e-3
bias_recentre = True
out_dir = 'out/deepseek_torchtitan'
