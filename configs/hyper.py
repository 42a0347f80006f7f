# HyperRouter (Do et al. 2023; LibMoE Hyper-R): router weights from a frozen random hypernetwork, k
# grows from hyper_k_min to top_k over training; LibMoE trains it without aux losses. As in
# HyperRouter and LibMoE (round(), topk_min = 1): k = 1 until past half of training, and a softmax
# over one value is constant, so the router gets no gradient then; hyper_k_min = 2 gives it one from
# the start.
router = 'hyper'
aux_loss_coef = 0.0
z_loss_coef = 0.0
hyper_k_min = 1
out_dir = 'out/hyper'
