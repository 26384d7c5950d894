# Llama 4's MoE layout in miniature on the Gutenberg benchmark: GQA, and MoE on every other layer
# (Maverick's interleaving) with one shared expert and one of 16 routed experts per token, sigmoid-gated.
# Matched to the dense GQA model of the same shape and schedule,
#   python train.py config/gutenberg_small.py --n_kv_head=2 --out_dir=out/gutenberg_gqa
# every token goes through 1 shared + 1 routed expert of 704 = 1408, the dense mlp_hidden, so the active
# parameters and FLOPs per token are the dense model's, up to the routers.
#   python train.py config/llama4_small.py
exec(open("config/gutenberg_small.py").read())  # its data, shape and schedule (run from the repository root)
out_dir = "out/llama4_small"

n_kv_head = 2
n_experts = 16
n_shared_experts = 1
moe_topk = 1
moe_hidden = 704
moe_every = 2                 # layers 1, 3, 5, 7 are MoE; 0, 2, 4, 6 dense
router_scoring = "sigmoid"
router_renorm = False         # the gate is the chosen expert's sigmoid score: renormalizing one gate would make it 1
aux_loss_coef = 0.01          # Switch balance loss (Llama 4's balancing is not published in detail)
