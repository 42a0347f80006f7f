# Expert-choice routing (Zhou et al. 2022): each expert takes its top C = ec_capacity_factor * T *
# top_k / E tokens of the batch (top_k = 2, factor 1: the paper's EC-CF2); balanced by construction,
# no aux loss. Not causal in training (a token's experts depend on the batch's later tokens); eval
# uses each token's own top-k (README)
router = 'expert_choice'
top_k = 2
ec_capacity_factor = 1.0
aux_loss_coef = 0.0
z_loss_coef = 0.0
out_dir = 'out/expert_choice'
