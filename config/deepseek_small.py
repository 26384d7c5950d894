# DeepSeek-V3 in miniature on the Gutenberg benchmark: MLA, DeepSeekMoE with a sigmoid router and
# auxiliary-loss-free balancing, and one MTP module, at the shape and schedule of config/gutenberg_small.py.
# Matched to it: MLA with a full-rank query has nearly the attention parameters of MHA, the first layer is the
# same dense SwiGLU, the MoE layers send every token through 1 shared + 3 of 16 routed experts of 352 = 1408, the
# dense width. The MTP module is training work only (one more block and a second pass through the output head per
# token), dropped at inference.
#   python train.py config/deepseek_small.py
exec(open("config/gutenberg_small.py").read())  # its data, shape and schedule (run from the repository root)
out_dir = "out/deepseek_small"

attention = "mla"
q_lora_rank = 0               # full-rank query, as DeepSeek-V2-Lite (V3: 1536 of 7168; set e.g. 128 to try it)
kv_lora_rank = 256            # 4 x head_dim, as V2/V3: the cache holds 256 + 32 numbers per token and layer
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64

n_experts = 16
n_shared_experts = 1
moe_topk = 3
moe_hidden = 352
moe_first_dense = 1           # V3: 3 of 61 layers
router_scoring = "sigmoid"
routed_scaling = 1.0          # V3: 2.5 for 8 of 256 experts; not tuned at this size
bias_update_rate = 1e-3       # V3's aux-loss-free balancing speed
seq_aux_loss_coef = 1e-4      # V3's sequence-wise balance loss

mtp_depth = 1
mtp_lambda = 0.3              # V3: 0.3 for the first 10T tokens, then 0.1
mtp_blocks = 1
