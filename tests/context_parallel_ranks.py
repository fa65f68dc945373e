"""Run under torchrun by tests/test_context_parallel.py: K ranks against one process, case by case.

Every rank builds the same model and batch, computes the one-process
reference (the plain model) itself, then the context-parallel forward and
backward over the K ranks (each rank's loss scaled by 1 / K, the gradients
summed over the ranks, as training does). Rank 0 writes, per case, the
largest differences of the loss, the logits and every parameter gradient
as JSON to argv[2]. argv[1]: a JSON list of cases (model config overrides,
padding, batch and block sizes).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from perceiver_ar import PerceiverAR, PerceiverARConfig, perceiver_ar_loss
from perceiver_ar.context_parallel import ContextParallel


def batch(case: dict, cfg: PerceiverARConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, T]; row r is cut to case["lengths"][r] (right-padded) when given."""
    g = torch.Generator().manual_seed(3)
    B, T = len(case.get("lengths", [0, 0])), case.get("T", cfg.context_len)
    inputs = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    for row, length in enumerate(case.get("lengths", [])):
        inputs[row, length:] = 0
        targets[row, length:] = 0
    return inputs, targets


def loss_and_grads(forward, model, inputs, targets, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout on every rank and in the reference
    out = forward(inputs)
    loss = perceiver_ar_loss(out.logits, targets, out.latent_index).total
    (loss * scale).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out.logits.detach(), grads


def main() -> None:
    cases, out_path = json.loads(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    K = dist.get_world_size()
    results = []
    for case in cases:
        torch.manual_seed(0)
        cfg = PerceiverARConfig(**case["config"])
        model = PerceiverAR(cfg).train()
        inputs, targets = batch(case, cfg)
        ref_loss, ref_logits, ref = loss_and_grads(model, model, inputs, targets)
        cp = ContextParallel(model, dist.group.WORLD, **case.get("blocks", {}))
        seen: list[int] = []  # the inputs this rank projects to keys and values: its slice only
        hook = model.cross_attend.kv_norm.register_forward_hook(
            lambda m, args, out, seen=seen: seen.append(out.shape[1])
        )
        loss, logits, grads = loss_and_grads(cp, model, inputs, targets, scale=1.0 / K)
        hook.remove()
        T, r = inputs.shape[1], dist.get_rank()
        if cfg.cross_attend_dropout > 0 and cfg.cross_attend_dropout_mode == "drop":  # the row shrinks first
            T = cfg.num_latents + round((1 - cfg.cross_attend_dropout) * (T - cfg.num_latents))
        assert seen == [(r + 1) * T // K - r * T // K], (seen, T)
        for g in grads.values():
            dist.all_reduce(g)  # what DDP does (it averages; the trainer scales by the data-parallel size)
        assert grads.keys() == ref.keys(), sorted(set(grads) ^ set(ref))
        results.append(
            {
                "name": case["name"],
                "loss": float(ref_loss),
                "loss_diff": float((loss - ref_loss).abs()),
                "logits_diff": float((logits - ref_logits).abs().max()),
                "grad_diff": max(float((grads[n] - ref[n]).abs().max()) for n in ref),
                "grad_scale": max(float(ref[n].abs().max()) for n in ref),
                "worst": max(ref, key=lambda n: float((grads[n] - ref[n]).abs().max())),
            }
        )
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
