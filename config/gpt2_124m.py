# The GPT-2 small shape (12 layers x 768 wide, 12 heads) in modern form: RMSNorm, RoPE, SwiGLU (hidden 2048),
# tied embeddings, GPT-2's tokenizer (vocab 50304 = 50257 padded to a multiple of 64). About 0.5M tokens per step,
# as in nanoGPT's GPT-2 config:
#   python prepare.py --dataset=fineweb_edu --tokenizer=gpt2
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
out_dir = "out/gpt2_124m"
data_dir = "data/fineweb_edu"
compile = True

n_layer = 12
n_head = 12
n_embd = 768
mlp_hidden = 2048
block_size = 1024
vocab_size = 50304

batch_size = 16
gradient_accumulation_steps = 32  # 16 x 1024 x 32 = 524,288 tokens per step
max_iters = 10000
learning_rate = 6e-4
warmup_iters = 700
weight_decay = 0.1
eval_interval = 500
