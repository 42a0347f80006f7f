# ReMoE (Wang et al., ICLR 2025): ReLU routing, weights = ReLU(Wx), a variable number of experts per
# token; a load-balanced L1 penalty whose coefficient adapts after each step toward sparsity 1 -
# top_k / n_experts (lambda_0 = 1e-8, alpha = 1.2, as ReMoE's Megatron scripts); the L1 penalty is
# its only balancing loss
router = 'remoe'
top_k = 2  # the target: top_k experts per token on average
aux_loss_coef = 0.0
remoe_l1_init = 1e-8
remoe_l1_alpha = 1.2
out_dir = 'out/remoe'
