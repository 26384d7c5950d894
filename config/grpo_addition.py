# GRPO on the addition task, from config/addition_pretrain.py's model.
init_from = "out/addition_pretrain"
out_dir = "out/grpo_addition"
task = "addition"
prompts_per_step = 64
group_size = 16               # 1024 rollouts per step
max_completion_length = 10    # '#### 1998' and the end-of-document token are 8 tokens
temperature = 1.0
loss_agg = "dapo"
eps = 0.2
eps_high = 0.28               # DAPO's clip-higher
beta = 0.0                    # no reference model
mu = 1
learning_rate = 5e-5
warmup_iters = 20
max_iters = 1500
eval_interval = 100
n_eval = 500
