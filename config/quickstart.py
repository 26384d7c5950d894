# A small model on the default offline dataset (python prepare.py), in a few minutes on a laptop CPU:
#   python train.py config/quickstart.py
out_dir = "out/quickstart"
data_dir = "data/pystdlib"
device = "cpu"
eval_interval = 100
eval_iters = 10
log_interval = 20

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128

batch_size = 16
max_iters = 600
learning_rate = 2e-3
warmup_iters = 30
