# Pretraining for the GRPO recipe (then config/grpo_addition.py): a small model learns addition from the
# generated examples alone. Data:
#   python grpo.py --mode=tasks --task=addition
#   python prepare.py --input=data/tasks/addition_train.jsonl --name=addition --vocab_size=280
# A constant learning rate after the warmup, so that the recipe can stop pretraining early (at the first round whose
# held-out accuracy reaches 15%) and resume it round by round with a larger max_iters without changing the schedule.
out_dir = "out/addition_pretrain"
data_dir = "data/addition"
n_layer = 6
n_head = 6
n_embd = 192                  # 2.7M parameters: a step this small is latency-bound on a GPU, so narrower saves nothing
block_size = 128              # about 7 problems of ~18 tokens per window
batch_size = 64
learning_rate = 1e-3
weight_decay = 0.1
warmup_iters = 50
lr_schedule = "wsd"
decay_frac = 0.0              # wsd without its decay: constant after the warmup
max_iters = 3000
eval_interval = 250
eval_iters = 10
log_interval = 50
