# Quantile balancing (Megatron-core quantile_balancing): experts chosen on Wx - beta, beta re-set
# after each optimizer step to the per-expert quantile that exactly T k / E tokens clear (averaged
# over the step's micro-batches and ranks, re-centred); weights from the unbiased softmax; no
# balance loss (Megatron requires it off)
router = 'quantile'
top_k = 2
aux_loss_coef = 0.0
qb_score_function = 'softmax'
qb_ema = 0.0
out_dir = 'out/quantile'
