"""The training loop: masked soft-target BCE, length-bucketed batches, resumable checkpoints."""

from __future__ import annotations

import math
import os
import pickle
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from classifier.errors import PromptierError
from classifier.tokenization import PromptEncoder
from training.config import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenize_all(encoder: PromptEncoder, texts: Sequence[str], chunk: int = 512) -> list[np.ndarray]:
    """Token ids per text (unpadded), through the runtime's own encoder."""
    out: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        batch = encoder.encode_batch(texts[start : start + chunk])
        out.extend(batch.input_ids[row, :count] for row, count in enumerate(batch.token_counts))
    return out


def _pad(ids: Sequence[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.from_numpy(x)
        mask[row, : len(x)] = 1
    return input_ids, mask


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled batches of similar-length prompts (less padding), fixed by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE against soft targets, ignoring NaN (unknown outcome) entries."""
    known = ~torch.isnan(targets)
    losses = nn.functional.binary_cross_entropy_with_logits(
        logits[known], targets[known], reduction="mean"
    )
    return losses


def fit(model: nn.Module, token_ids: list[np.ndarray], targets: np.ndarray, config: TrainConfig,
        work_dir: Path, description: str = "train") -> nn.Module:
    """Train `model` in place; resume from `work_dir/checkpoint.pt` if a previous run left one.

    Args:
        token_ids: per-prompt token ids from `tokenize_all`.
        targets: [n, n_tiers] soft targets in [0, 1], NaN where unknown.
    """
    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(x) for x in token_ids])
    steps_per_epoch = math.ceil(len(token_ids) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    step = 0
    checkpoint_path = work_dir / CHECKPOINT_FILE
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    target_tensor = torch.tensor(targets, dtype=torch.float32)
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc=description, unit="step", dynamic_ncols=True)
    running = None
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = epoch_batches(lengths, config.batch_size, config.seed, epoch)
        for batch in batches[offset:]:
            if step >= total_steps:
                break
            input_ids, mask = _pad([token_ids[i] for i in batch])
            loss = masked_bce(model(input_ids, mask), target_tensor[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            progress.update(1)
            progress.set_postfix(loss=f"{running:.4f}", epoch=epoch)
            if step % config.checkpoint_every == 0 or step == total_steps:
                _save_checkpoint(checkpoint_path, model, optimizer, scheduler, step)
    progress.close()
    model.eval()
    return model


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by training (or a bare state dict) onto the CPU.

    A checkpoint is a pickle, and unpickling can run code; only tensors, numbers, strings and plain
    containers are read (torch's weights_only), which is all a checkpoint holds (the RNG state is a
    tensor).

    Raises:
        PromptierError: the file holds anything else, so it is refused unread.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PromptierError(f"{path} holds objects other than tensors, numbers and containers: refused, since "
                             f"loading it could run code. Use checkpoints written by promptier train.") from exc
    if not isinstance(state, dict):
        raise PromptierError(f"{path} is not a checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def _save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
    }
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


@torch.no_grad()
def predict_logits(model: nn.Module, token_ids: list[np.ndarray], batch_size: int = 64,
                   description: str | None = None) -> np.ndarray:
    """Logits [n, n_tiers], computed in length-sorted batches and returned in input order."""
    return predict(model, token_ids, batch_size, description)


@torch.no_grad()
def predict(model: nn.Module, token_ids: list[np.ndarray], batch_size: int = 64, description: str | None = None,
            method: str = "forward") -> np.ndarray:
    """`model.<method>(input_ids, mask)` [n, ...], in length-sorted batches, returned in input order."""
    model.eval()
    function = getattr(model, method)
    order = np.argsort([len(x) for x in token_ids], kind="stable")
    outputs: list[np.ndarray] = []
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=description is None):
        batch = order[start : start + batch_size]
        input_ids, mask = _pad([token_ids[i] for i in batch])
        outputs.append(function(input_ids, mask).numpy())
    logits = np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
    result = np.empty_like(logits)
    result[order] = logits
    return result
