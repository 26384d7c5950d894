# The attention, residual and memory variants on the Gutenberg benchmark at equal tokens: one epoch each of
# config/gutenberg_small.py (8 x 512, context 1024), compared by exact val bits per byte. On one GPU:
#   python ablate.py config/sweep_variants.py --parallel=3
out_dir = "out/sweep_variants"
common = "config/gutenberg_small.py --eval_interval=1000"
runs = [
    "baseline: ",
    # which keys a query sees (context 1024): a 256-token window; local blocks + strided blocks; MoBA over 128-token blocks
    "sliding: --attn_span=sliding --window=256",
    "sparse: --attn_span=sparse --sparse_block=64 --sparse_local=4 --sparse_stride=4",
    "moba: --attn_span=moba --moba_block=128 --moba_topk=3",
    # gated attention (Qwen): per head or per element, after attention or on the values
    "gate_headwise: --attn_gate=headwise",
    "gate_elementwise: --attn_gate=elementwise",
    "gate_value: --attn_gate=elementwise --attn_gate_at=value",
    # linear attention and hybrids
    "linear_elu: --attention=linear --linear_kind=elu",
    "gated_deltanet: --attention=linear --linear_kind=gated_deltanet",
    "hybrid_SSSG: --attn_pattern=SSSG --window=256",
    "hybrid_LLLG: --attn_pattern=LLLG --linear_kind=gated_deltanet",
    # residual streams and memory
    "hc: --residual=hc",
    "mhc: --residual=mhc",
    "engram: --engram_layers=1,4",
    "mhc_engram: --residual=mhc --engram_layers=1,4",
]
