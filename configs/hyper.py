# HyperRouter (Do et al. 2023; LibMoE Hyper-R): router weights from a frozen random hypernetwork,
# k grows from 1 to top_k over training; LibMoE trains it without aux losses
router = 'hyper'
aux_loss_coef = 0.0
z_loss_coef = 0.0
out_dir = 'out/hyper'
