# Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts"): experts by decreasing
# probability until their cumulative probability exceeds 0.4; balance loss 1e-2 and dynamic
# (entropy) loss 1e-4, as the paper
router = 'topp'
topp_threshold = 0.4
topp_max = 0  # 0 = up to n_experts per token
topp_entropy_coef = 1e-4
aux_loss_coef = 1e-2
z_loss_coef = 0.0  # the paper has no z-loss
out_dir = 'out/topp'
