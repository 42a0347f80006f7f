# TC-MoE (ternary expert choice; LibMoE v2 moe_tcmoe.py): positive, negative and null slots; null
# slots skip compute, negative slots subtract their expert; the balance loss counts non-null
# assignments only
router = 'tcmoe'
out_dir = 'out/tcmoe'
