# DeepSeek-V4 routing (Megatron's sqrtsoftplus score function): s = sqrt(softplus(Wx)), top-k of
# s + b with the aux-loss-free bias (u = 1e-3), weights the unbiased s renormalised, one shared
# expert, the routed output scaled by 1.5 (DeepSeek-V4-Flash's routed_scaling_factor), a tiny
# sequence-wise balance loss as deepseek.py
router = 'deepseek'
score_function = 'sqrtsoftplus'
n_shared_experts = 1
top_k = 2
routed_scale = 1.5
aux_loss_coef = 1e-4
balance_scope = 'sequence'
bias_update_rate = 1e-3
out_dir = 'out/sqrtsoftplus'
