"""
Evaluation that is exact rather than sampled: bits per byte over whole token streams, and multiple-choice accuracy.
Both take a GPT in eval mode and split their work over the processes of a torchrun (rank, world_size); every
process returns the same totals.
"""
import json
from contextlib import nullcontext

import numpy as np
import torch

from configurator import all_reduce_sum, read_text


def batch_of(rows, T, scored=None, pad_id=0):
    """(x, y) of token rows of at most T + 1 ids: inputs, pad_id after a row's end, and next-token targets, -1 (no
    target) after a row's end and, given scored (a count per row), before each row's last scored[r] tokens."""
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full_like(x, -1)
    for r, row in enumerate(rows):
        x[r, :len(row) - 1], y[r, :len(row) - 1] = torch.as_tensor(row[:-1]), torch.as_tensor(row[1:])
        if scored is not None:  # a row cut to its last T + 1 ids may hold fewer than scored[r] targets: all score
            y[r, :max(0, len(row) - 1 - scored[r])] = -1
    return x, y


def token_logprobs(model, idx, targets, temperature=1.0):
    """log pi(target) (B, T) at each position with a target, 0 elsewhere: an fp32 log-softmax of logits / temperature,
    the distribution the completions were sampled from."""
    logits = model(idx, targets)[0].float() / temperature  # (B, T, V): with targets, every position's logits
    return logits.log_softmax(dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets >= 0)


@torch.no_grad()
def exact_bits_per_byte(model, streams, n_bytes, eos_id, batch_size, amp=nullcontext(), rank=0, world_size=1):
    """Total nats over every token of the streams (each starting after an end-of-document token, so that its first
    token is predicted too), in non-overlapping block_size windows, per UTF-8 byte they encode, divided by ln 2."""
    T, device, nats = model.config.block_size, model.wte.weight.device, 0.0
    for tokens in streams:
        tokens = np.concatenate([[eos_id], tokens]).astype(np.int64)
        windows = [tokens[s:s + T + 1] for s in range(0, len(tokens) - 1, T)]
        for b in range(rank * batch_size, len(windows), world_size * batch_size):
            x, y = batch_of(windows[b:b + batch_size], T)
            with amp:
                loss = model(x.to(device), y.to(device))[1]  # the mean over the targets
            nats += loss.item() * (y >= 0).sum().item()
    return all_reduce_sum(nats, device=device)[0] / n_bytes / np.log(2)


def read_tasks(path):
    """The tasks of a JSONL file, one per line in task_accuracy's shape, or a ValueError naming the file and line."""
    tasks = []
    for number, line in enumerate(read_text(path, "tasks file").split("\n"), 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON ({e.msg})") from None
        choices = task.get("choices") if isinstance(task, dict) else None
        if not (isinstance(choices, list) and choices and all(isinstance(choice, str) for choice in choices)
                and isinstance(task.get("context"), str)):
            raise ValueError(f"{path} line {number} is not a task: "
                             '{"context": "...", "choices": ["...", ...], "answer": index}')
        answer, n = task.get("answer"), len(choices)
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n):
            raise ValueError(f"{path} line {number}: answer {answer!r} is not the index of one of its {n} choices")
        tasks.append(task)
    if not tasks:
        raise ValueError(f"tasks file {path} holds no task")
    return tasks


@torch.no_grad()
def task_accuracy(model, tasks, tokenizer, eos_id, amp=nullcontext(), rank=0, world_size=1):
    """Multiple-choice accuracy on tasks {"context": str, "choices": [str, ...], "answer": index} (HellaSwag's shape,
    ARC's, PIQA's): each choice is scored by the log-likelihood of its tokens after the context, in total ('acc') and
    per UTF-8 byte of the choice ('acc_norm', which does not favour short choices, as lm-evaluation-harness); the
    highest score is the model's answer. Returns (acc, acc_norm)."""
    T, device, correct = model.config.block_size, model.wte.weight.device, [0.0, 0.0]
    for task in tasks[rank::world_size]:
        context = [eos_id] + tokenizer.encode(task["context"])
        choices = [tokenizer.encode(choice) for choice in task["choices"]]
        rows = [(context + choice)[-(T + 1):] for choice in choices]  # the last T + 1 tokens
        x, y = (t.to(device) for t in batch_of(rows, T, scored=[len(choice) for choice in choices]))
        with amp:
            total = token_logprobs(model, x, y).sum(dim=1)
        per_byte = total / torch.tensor([max(1, len(c.encode("utf-8"))) for c in task["choices"]], device=device)
        correct[0] += int(total.argmax().item() == task["answer"])
        correct[1] += int(per_byte.argmax().item() == task["answer"])
    acc, acc_norm = all_reduce_sum(*correct, device=device)
    return acc / len(tasks), acc_norm / len(tasks)
