# The speedrun candidates at the one-epoch budget of the Gutenberg benchmark: each is one flag on the Muon recipe
# (config/gutenberg_small.py with Muon and 32 x 512 tokens per step), all on the same 933 steps of the same tokens;
# then the recipe and the best four again with a second seed, so that the table shows the noise. Eager (no compile
# time), six runs sharing one GPU:
#   python prepare.py --dataset=gutenberg
#   python ablate.py config/sweep_speedrun.py --parallel=6
out_dir = "out/sweep_speedrun"
common = "--eval_interval=1000 --compile=False"  # only the final evaluation counts here
train_tokens = 15_286_272  # 933 steps of 32 x 512 tokens: one epoch of the training books
_muon = "config/gutenberg_small.py --optimizer=muon --learning_rate=4e-3 --block_size=512 --batch_size=32"
runs = [  # the recipe first (it is always repeated)
    f"muon: {_muon}",
    f"relu2: {_muon} --mlp=relu2",
    f"softcap: {_muon} --logit_softcap=15",
    f"value_embeds: {_muon} --value_embeds=0,1,2",
    f"value_residual: {_muon} --value_residual=True",
    f"x0_mix: {_muon} --x0_mix=True",
    f"zero_init_proj: {_muon} --zero_init_proj=True",
    f"untied: {_muon} --tie_embeddings=False",
    f"untied_embed_lr: {_muon} --tie_embeddings=False --embed_lr=0.05",
    f"momentum_warmup: {_muon} --muon_momentum_warmup=300",
    f"wsd: {_muon} --lr_schedule=wsd --decay_frac=0.5",
    f"muon_lr: {_muon} --muon_lr=1e-2",
    f"mtp: {_muon} --mtp_depth=1",
    f"polar_express: {_muon} --muon_schedule=polar_express",
    f"normuon: {_muon} --normuon_beta2=0.95",
    f"cautious_wd: {_muon} --cautious_wd=True",
    f"unet_skips: {_muon} --unet_skips=True",
    f"seq_warmup: {_muon} --seq_warmup=0.3",
    f"window_warmup: {_muon} --attn_span=sliding --window=512 --window_warmup=0.3",
    f"batch_warmup: {_muon} --batch_size=8 --gradient_accumulation_steps=4 --batch_warmup=0.3",
    f"all: {_muon} --mlp=relu2 --logit_softcap=15 --value_embeds=0,1,2 --x0_mix=True --tie_embeddings=False"
    " --embed_lr=0.05 --muon_momentum_warmup=300 --lr_schedule=wsd --decay_frac=0.5",
]
seeds = [1337]
repeat_best = 4
repeat_seeds = [1338]
