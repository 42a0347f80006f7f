# Switch Transformer (Fedus et al. 2021): top-1, weight = max p, input jitter, capacity factor 1.25
router = 'switch'
top_k = 1
capacity_factor = 1.25
out_dir = 'out/switch'
