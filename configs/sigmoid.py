# sigma-MoE (Csordas et al. 2023; LibMoE Sigmoid-R): top-k of sigmoid scores, renormalised as LibMoE
router = 'sigmoid'
out_dir = 'out/sigmoid'
