# A small model on the default offline dataset (python prepare.py), trained on the CPU.
#   python train.py config/quickstart.py
out_dir = "out/quickstart"
data_dir = "data/pystdlib"
device = "cpu"
eval_interval = 100
eval_iters = 10
log_interval = 10

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128

batch_size = 16
max_iters = 400
learning_rate = 2e-3
warmup_iters = 30
