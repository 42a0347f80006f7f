# Global-batch load balance (Qiu et al. 2025, "Demons in the Detail"; Qwen3; Megatron's
# global_aux_loss): the balance loss's expert shares f_e from the counts of every micro-batch of the
# step so far on every rank, the probabilities P_e local. Goes after a router: python train.py
# configs/softmax.py configs/global_balance.py
balance_scope = 'global'
