# cosine router. cosine_variant = 'xmoe': X-MoE as LibMoE v2 benchmarked it (xmoe.py): projection to
# E/2 dims, expert embeddings held at norm 1.5, temperature 0.3, softmax over the top-k
# probabilities. 'libmoe': LibMoE v1.1 Cosine-R (moe_cosinegating.py): full-dim cosine, no
# temperature, gate bias added to the probabilities before top-k, softmax over the k. Neither has a
# z-loss (bounded logits).
router = 'cosine'
cosine_variant = 'xmoe'
out_dir = 'out/cosine'
