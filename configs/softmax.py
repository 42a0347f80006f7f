# softmax top-k router, renormalised (Shazeer et al. 2017; Mixtral; LibMoE SMoE-R)
router = 'softmax'
out_dir = 'out/softmax'
