"""
precision.py -- how one training step fits one GPU: fp32 master weights, optimizer offload, gradient
checkpointing. OPTIONAL READING: nsr.py and runs.py call these, and none of them changes the math.

    make_trainable(model, cfg, lr)  -> Trainable: the model, the fp32 tensors AdamW updates, the AdamW
    grads_to_master(t)              after each micro-batch's backward: its (bf16) grads summed in fp32
    optimizer_step(t, grad_clip)    clip the global grad norm, AdamW on the masters, copy into the model
    enable_gradient_checkpointing(model), checkpointing_on(cfg, num_params): recompute activations

WHY FP32 MASTER WEIGHTS. On a GPU the model computes in bf16, but an AdamW step at the paper's lr 1e-6
moves a weight of size 0.02 by ~1e-6, far below bf16's resolution there (one bf16 step at 0.02 is
2^-13 = 1.2e-4), so a bf16-only update rounds back to the old weight and training silently does nothing
(test_bf16_training_with_fp32_master_weights_... shows it). So the optimizer owns fp32 copies: bf16 grads
are added into fp32 grads after every micro-batch, AdamW updates the fp32 copy, the bf16 model gets
round(master). With an fp32 model (the CPU default) the model's own weights are the master.

BYTES PER PARAMETER (the one place this is written; presets.memory_plan computes with it):
    bf16 model:  2 (bf16 weight) + 2 (bf16 grad) + 4 (fp32 master) + 4 (its grad) + 8 (AdamW m, v) = 20
    fp32 model:  4 (weight = master) + 4 (grad) + 8 (AdamW m, v)                                   = 16
    --optimizer-offload: the 16 bytes of masters, their grads and m, v live in CPU RAM; the GPU keeps the
    bf16 weights and grads and, between micro-batches, their fp32 sum: 8 bytes while training, 2 sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trainable:
    """A model and what its optimizer owns: the policy, or the ppo critic."""
    model: torch.nn.Module
    params: list                  # the model's trainable parameters (bf16 or fp32)
    master: list                  # the fp32 tensors AdamW updates: `params` itself for an fp32 model on-device
    optimizer: torch.optim.Optimizer
    accum: list | None = None     # --optimizer-offload: fp32 gradient sums on the model's device (grads_to_master)


def make_trainable(model, cfg, lr: float) -> Trainable:
    """fp32 master weights and their AdamW (cfg: optimizer, adam_beta1, adam_beta2, weight_decay, optimizer_offload).

    With cfg.optimizer_offload the masters and AdamW's m and v live in CPU RAM (pinned when a GPU is there,
    so the copies can run asynchronously). Per OPTIMIZER STEP the GPU sends P x 4 bytes of summed fp32
    grads down and receives P x 2 bytes of bf16 weights back, and AdamW runs on the CPU (measured for
    1.54e9 parameters: `python bench.py offload`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params) and not cfg.optimizer_offload:
        master = params
    else:
        where = "cpu" if cfg.optimizer_offload else params[0].device
        pin = cfg.optimizer_offload and torch.cuda.is_available()
        copies = [p.detach().to(where, torch.float32).clone() for p in params]
        master = [torch.nn.Parameter(c.pin_memory() if pin else c) for c in copies]
    if cfg.optimizer == "sgd":          # the ablation: no per-parameter scaling of the step (no momentum)
        optimizer = torch.optim.SGD(master, lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(master, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
    return Trainable(model, params, master, optimizer, [None] * len(params) if cfg.optimizer_offload else None)


def grads_to_master(t: Trainable) -> None:
    """After a micro-batch's backward: add each model grad (bf16) into an fp32 sum and free it. On-device,
    the sum is the master's own .grad; with --optimizer-offload it is an fp32 buffer on the model's
    device (t.accum), moved to the CPU master once, in optimizer_step: the same fp32 additions in the same
    order (so the same result, bit for bit), without a PCIe transfer and a CPU pass per micro-batch.
    No-op where the model's weights are their own master (fp32, on-device)."""
    for i, (p, m) in enumerate(zip(t.params, t.master)):
        if p is m or p.grad is None:
            continue
        if t.accum is not None:                                              # offload: sum on the GPU
            t.accum[i] = p.grad.float() if t.accum[i] is None else t.accum[i].add_(p.grad)
        else:
            m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)   # accumulate in fp32
        p.grad = None


def optimizer_step(t: Trainable, grad_clip: float):
    """Clip the master gradient, AdamW-update the master, copy it into the model.
    Returns the gradient norm before clipping (a 0-d tensor; non-finite = nothing was changed)."""
    if t.accum is not None:                    # offload: the fp32 grad sums go down to the CPU masters
        for i, m in enumerate(t.master):
            if t.accum[i] is not None:
                m.grad, t.accum[i] = t.accum[i].to(m.device), None
    # g <- g * min(1, grad_clip / ||g||); the returned norm is the one before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(t.master, grad_clip if grad_clip > 0 else float("inf"))
    if torch.isfinite(grad_norm):
        t.optimizer.step()
        with torch.no_grad():
            for p, m in zip(t.params, t.master):
                if p is not m:
                    p.copy_(m, non_blocking=True)      # model <- round(fp32 master), CPU -> GPU with offload
    zero_grads(t)
    return grad_norm


def zero_grads(t: Trainable) -> None:
    """Free the master grads (the optimizer's), the offload sums and the model's own grads (bf16 leftovers)."""
    t.optimizer.zero_grad(set_to_none=True)
    for p in t.params:
        p.grad = None
    if t.accum is not None:
        t.accum[:] = [None] * len(t.accum)


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---- gradient checkpointing -----------------------------------------------------------------------

def checkpointing_on(cfg, num_params: int) -> bool:
    """--grad-checkpointing: on, off, or auto = on for models above cfg.checkpointing_min_params."""
    return cfg.grad_checkpointing == "on" or (cfg.grad_checkpointing == "auto"
                                              and num_params > cfg.checkpointing_min_params)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them: the memory
    of activations drops from O(layers x tokens x hidden) to O(tokens x hidden) plus one layer,
    for ~1 extra forward pass of compute. Only active in train() mode. use_reentrant=False is the
    variant PyTorch recommends (works with inputs that do not require grad). The output layer's
    logits are chunked separately (sample.response_logprobs, head_chunk)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):       # the name in recent transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:                                                      # older 5.x / 4.x name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
