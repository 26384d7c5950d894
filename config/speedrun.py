# The speedrun: nanoGPT's quality on the Gutenberg benchmark in a fraction of its training time. The benchmark model
# (8 layers x 512) with Muon, an untied head, an embedding at a 12.5x higher lr, embedding-skip mixing, value
# residual and Muon's momentum warmed up, 32 x 512 tokens per step, a 0.3-epoch cosine schedule, stopping at
# nanoGPT's exact val bits per byte (docs/results.md, "Speedrun"):
#   python prepare.py --dataset=gutenberg
#   python train.py config/speedrun.py
# The same recipe over one whole epoch, its head at twice AdamW's lr, NorMuon at a lower lr and the first 30% of the
# steps on shorter sequences (docs/results.md: 1.300 against the Muon recipe's 1.378):
#   python train.py config/speedrun.py --epochs=1 --muon_momentum_warmup=300 --head_lr=8e-3 --normuon_beta2=0.95 --muon_lr=3.5e-3 --seq_warmup=0.3 --target_bpb=0 --out_dir=out/speedrun_epoch
out_dir = "out/speedrun"
data_dir = "data/gutenberg"
compile = True

n_layer = 8
n_head = 8
n_embd = 512
block_size = 512
tie_embeddings = False
x0_mix = True
value_residual = True

sampler = "epoch"
epochs = 0.3
batch_size = 32                # 32 x 512 = 16,384 tokens per step
optimizer = "muon"
learning_rate = 4e-3           # AdamW's peak lr: the head, norms and scalars
muon_lr = 6e-3                 # Muon's, in Moonlight's units (config/gutenberg_small.py)
embed_lr = 0.05                # the token embedding's (AdamW, no weight decay)
muon_momentum_warmup = 100
warmup_iters = 40
min_lr_frac = 0.0
weight_decay = 0.1
eval_interval = 1000           # the target checks evaluate; no other evaluation on the clock's way

target_bpb = 1.545             # nanoGPT's recipe on these shards: 1.545 to 1.550 in four runs
target_interval = 25
