# Benchmarking only (Megatron's --moe-router-force-load-balancing, torchtitan's
# debug.moe_force_load_balance): any router's choices replaced by a balanced round-robin assignment
# (token t's slot j -> expert (t k + j) mod E), so that speed is measured apart from what the router
# learned. Goes after a router config.
force_balance = True
