# The Gutenberg benchmark: a ~25M non-embedding model, 8 layers x 512, one epoch over the training books in
# epoch mode, on one GPU (three whole books are held out as val):
#   python prepare.py --dataset=gutenberg     # fetches and checks the 96 books, writes data/gutenberg
#   python train.py config/gutenberg_small.py
out_dir = "out/gutenberg_small"
data_dir = "data/gutenberg"
compile = True

n_layer = 8
n_head = 8
n_embd = 512
block_size = 1024

sampler = "epoch"
epochs = 1.0
batch_size = 32                # 32 x 1024 = 32,768 tokens per step
learning_rate = 1e-3           # AdamW's peak lr, tuned at this shape
warmup_iters = 40
min_lr_frac = 0.0
weight_decay = 0.1
eval_interval = 100
eval_iters = 20

# --optimizer=muon or muonclip: Muon's peak lr in Moonlight's units (muon_lr_scale='moonshot': an update RMS of
# 0.2 x lr, as AdamW's). The Muon reference's 0.02-0.05 under modded-nanogpt's scale comes to 0.02-0.05 / (0.2 x
# sqrt(512)) = 4.4e-3 to 1.1e-2 on these 512-wide matrices.
# With --muon_lr_scale=shape, set --muon_lr too (e.g. 0.02).
muon_lr = 6e-3
