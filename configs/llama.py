# block flavour preset: llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no
# biases). Put it after a size preset: the SwiGLU width is computed from n_embd (about 8/3 n_embd,
# as Llama).
arch = 'llama'
n_kv_head = n_head // 2
mlp_hidden = 8 * ((8 * n_embd // 3 + 7) // 8)
