"""
Optimizers shared by train.py and grpo.py.

configure_optimizers builds the parameter groups once, so that every stage trains the same way:
AdamW (Loshchilov & Hutter 2019) with weight decay on matrices (every >= 2-D weight: linear layers and
embeddings) and none on vectors (norm gains), fused into one kernel on CUDA.
"""
import torch


def configure_optimizers(model, optimizer="adamw", learning_rate=6e-4, weight_decay=0.1, betas=(0.9, 0.95),
                         device_type="cpu"):
    if optimizer != "adamw":
        raise ValueError(f"unknown optimizer '{optimizer}' (choose adamw)")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
