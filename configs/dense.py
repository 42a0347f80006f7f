# the dense baseline every table needs: no router, a plain MLP in every layer
router = 'dense'
out_dir = 'out/dense'
