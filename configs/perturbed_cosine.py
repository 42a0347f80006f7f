# perturbed cosine router (Nguyen et al. 2024; LibMoE PertCos-R): theta = 0.1 added to both norms
router = 'perturbed_cosine'
out_dir = 'out/perturbed_cosine'
