# MoE++ (Jin et al. 2024; LibMoE v2): FFN experts plus zero, copy and constant experts that cost no
# FFN; gating residual (the router adds a projection of the previous MoE layer's logits) and a
# balance loss whose zero-computation terms are weighted by tau (1 = the plain balance loss)
router = 'moepp'
moepp_gate_residual = True
moepp_tau = 0.75
out_dir = 'out/moepp'
