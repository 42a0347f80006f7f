# MoE++ (Jin et al. 2024; LibMoE v2): FFN experts plus zero, copy and constant experts that cost no FFN
router = 'moepp'
out_dir = 'out/moepp'
