# A Qwen3-Next-style hybrid on the Gutenberg benchmark: in every 4 layers, 3 Gated DeltaNet layers
# (linear attention: a fixed-size recurrent state instead of a KV cache) and 1 full softmax attention layer with
# QK-norm and Qwen's elementwise output gate, at the shape and schedule of config/gutenberg_small.py.
# A Gated DeltaNet layer has more weights than an attention layer (its output gate, decays, conv). Then Gemma's
# local/global pattern instead, in a folder of its own:
#   python train.py config/hybrid_small.py
#   python train.py config/hybrid_small.py --attn_pattern=SSSG --window=256 --out_dir=out/hybrid_sssg
exec(open("config/gutenberg_small.py").read())  # its data, shape and schedule (run from the repository root)
out_dir = "out/hybrid_small"

attn_pattern = "LLLG"         # layers 0-2 and 4-6 linear, 3 and 7 softmax (Qwen3-Next: 3 Gated DeltaNet : 1 gated)
linear_kind = "gated_deltanet"
attn_gate = "elementwise"     # on the softmax layers, after attention (the paper's G1)
qk_norm = True
