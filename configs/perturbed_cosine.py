# perturbed cosine router (Nguyen et al. 2024; LibMoE PertCos-R, v1.1 moe_perturbed.py): theta = 0.1
# added to both norms of a full-dim cosine, no temperature, gate bias added to the probabilities
# before top-k, softmax over the k. cosine_variant = 'xmoe' puts the same score into X-MoE's
# projected router instead.
router = 'perturbed_cosine'
cosine_variant = 'libmoe'
out_dir = 'out/perturbed_cosine'
