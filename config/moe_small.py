# A fine-grained MoE on the Gutenberg benchmark, matched to config/gutenberg_small.py: the same 8
# layers x 512 and schedule, and every token through the same feed-forward width, 1 shared + 3 of 16 routed experts
# of 352 = 4 x 352 = 1408, the dense mlp_hidden (DeepSeekMoE's segmentation: the dense FFN cut into 4 experts). So
# the active parameters and FLOPs per token match the dense model's up to the routers, while the experts hold
# (16 + 1) x 352 = 4.25 x 1408 hidden units.
#   python train.py config/moe_small.py
exec(open("config/gutenberg_small.py").read())  # its data, shape and schedule (run from the repository root)
out_dir = "out/moe_small"

n_experts = 16
n_shared_experts = 1
moe_topk = 3
moe_hidden = 352
router_scoring = "softmax"
aux_loss_coef = 0.01          # Switch/GShard balance loss, as DeepSeekMoE trained with
router_z_loss_coef = 1e-3     # ST-MoE's z-loss
capacity_factor = 0.0         # dropless
