# The fixed-compute sweep: each variant of config/gutenberg_small.py (8 x 512, context 1024)
# gets the training FLOPs of one epoch of the dense baseline, 204,496,896 FLOPs per token x 15,269,888 tokens: a
# variant that costs more per token trains on fewer tokens. One seed each; then the baseline and the best three
# again with a second seed, so that the table shows the noise. On one GPU, four small runs sharing it:
#   python ablate.py config/sweep_gutenberg.py --parallel=4
out_dir = "out/sweep_gutenberg"
common = "--eval_interval=100 --compile=True"  # five points on each val curve
train_flops = 3.1226e15
runs = [  # the baseline first (it is always repeated), then the slowest runs, so that the last wave is not one long run
    "dense_adamw: config/gutenberg_small.py",
    "hybrid_LLLG: config/gutenberg_small.py --attn_pattern=LLLG --linear_kind=gated_deltanet",
    "mhc: config/gutenberg_small.py --residual=mhc",
    "hc: config/gutenberg_small.py --residual=hc",
    "deepseek_small: config/deepseek_small.py",
    "moe: config/moe_small.py",
    "dense_muon: config/gutenberg_small.py --optimizer=muon --learning_rate=4e-3",
    "gqa: config/gutenberg_small.py --n_kv_head=2",
    "mla: config/gutenberg_small.py --attention=mla --kv_lora_rank=256 --qk_nope_head_dim=64 --qk_rope_head_dim=32"
    " --v_head_dim=64",
    "sliding: config/gutenberg_small.py --attn_span=sliding --window=256",
    "hybrid_SSSG: config/gutenberg_small.py --attn_pattern=SSSG --window=256",
    "engram: config/gutenberg_small.py --engram_layers=1,4",
]
seeds = [1337]
repeat_best = 3
repeat_seeds = [1338]
