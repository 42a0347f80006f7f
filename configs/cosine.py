# X-MoE cosine router (Chi et al. 2022; LibMoE Cosine-R): routing space E/2, temperature 0.3
router = 'cosine'
out_dir = 'out/cosine'
