# sigma-MoE router (Csordas et al. 2023), top-k of sigmoid scores, renormalised (LibMoE Sigmoid-R)
router = 'sigmoid'
out_dir = 'out/sigmoid'
