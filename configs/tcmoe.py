# TC-MoE (ternary expert choice; LibMoE v2): positive, negative and null slots; null slots skip compute
router = 'tcmoe'
out_dir = 'out/tcmoe'
