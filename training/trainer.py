"""The training loop: masked soft-target BCE, length-bucketed batches, resumable checkpoints, on a CPU or GPU,
in one process or several (DistributedDataParallel)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from classifier.errors import PromptierError
from classifier.tokenization import PromptEncoder
from training.config import TrainConfig
from training.devices import Placement, resolve_device, resolve_precision

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# The checkpoint entry holding the finished run's familiarity statistics (training.model.FeatureStatistics).
FAMILIARITY_STATISTICS = "familiarity_statistics"
# The settings a checkpoint's steps depend on. The others (device, precision, threads, max_steps, and what
# is chosen after training: calibration, thresholds, export) may change between a run and its resumption.
_RUN_SETTINGS = ("backbone", "student", "max_tokens", "head_fraction", "head_chars", "tail_chars", "epochs",
                 "batch_size", "learning_rate", "warmup_ratio", "weight_decay", "freeze_embeddings", "seed")


def run_key(config: TrainConfig, source: TokenSource, targets: np.ndarray, chunk: int = 4096,
            starting_run: str | None = None) -> str:
    """What identifies one training run: its examples (token ids and targets), the settings its steps
    depend on and, for a run that continues a model, the model it starts from (`starting_run`: its own
    run's key). A checkpoint carries it, so that a rerun resumes only the same run: edited prompts of the same
    token counts are another run too, and so is the same continuation of another starting model. One
    read of every example's ids."""
    digest = hashlib.sha256(json.dumps({name: getattr(config, name) for name in _RUN_SETTINGS}, sort_keys=True,
                                       default=lambda value: value.model_dump()).encode())
    if starting_run is not None:
        digest.update(b"start:" + starting_run.encode())
    digest.update(np.ascontiguousarray(source.lengths, dtype=np.int64).tobytes())  # where each example ends
    for start in range(0, len(source), chunk):
        batch = source.batch(np.arange(start, min(start + chunk, len(source))))
        digest.update(np.concatenate(batch).astype(np.int64, copy=False).tobytes())  # one update per chunk
    digest.update(np.ascontiguousarray(np.nan_to_num(targets, nan=-1.0), dtype=np.float32).tobytes())
    return digest.hexdigest()[:32]


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


@runtime_checkable
class TokenSource(Protocol):
    """Token ids of training examples, read a batch at a time (a list in memory, or a store on disk)."""

    @property
    def lengths(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> list[np.ndarray]: ...


class ListTokens:
    """A TokenSource over per-prompt arrays held in memory (what `tokenize_all` returns)."""

    def __init__(self, token_ids: Sequence[np.ndarray]) -> None:
        self._ids = token_ids
        self._lengths = np.array([len(x) for x in token_ids])

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __len__(self) -> int:
        return len(self._ids)

    def batch(self, indices: np.ndarray) -> list[np.ndarray]:
        return [self._ids[i] for i in indices]


def shard(batch: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, float]:
    """This process's share of a global batch, and its weight in the loss.

    Every process draws the same global batches (same seed) and takes a contiguous slice of each, so
    N processes together take the steps one process would. A batch smaller than the number of
    processes leaves some without an example: they run one of another's with weight 0, because every
    process must take part in each gradient all-reduce.
    """
    mine = np.array_split(batch, world_size)[rank]
    return (mine, 1.0) if len(mine) else (batch[:1], 0.0)


def sharded_bce(logits: torch.Tensor, targets: torch.Tensor, weight: float, global_known: int,
                world_size: int) -> torch.Tensor:
    """This shard's part of the global batch's masked BCE, scaled for DDP's gradient averaging.

    DDP averages gradients over processes; a per-process mean would weigh each shard equally
    however many known outcomes it holds. Summing each shard's losses and dividing by the global
    batch's count (times the number of processes that DDP divides by) gives one process's gradient.
    """
    known = ~torch.isnan(targets)
    losses = nn.functional.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    return (losses * known).sum() * (weight * world_size / max(global_known, 1))


def fit(model: nn.Module, token_ids: Sequence[np.ndarray] | TokenSource, targets: np.ndarray, config: TrainConfig,
        work_dir: Path, description: str = "train", placement: Placement | None = None,
        report: dict | None = None, starting_run: str | None = None) -> nn.Module:
    """Train `model` in place; resume from `work_dir/checkpoint.pt` if a previous run left one.

    Runs where `placement` says (default: the config's device, one process). In a distributed run
    every process calls this with the same examples; only the main one writes checkpoints. A
    checkpoint holds the unwrapped model's weights (read back onto the CPU), so a run may resume on
    another device or with another number of processes (with the same global `batch_size`).

    Args:
        token_ids: per-example token ids (from `tokenize_all`, or a TokenSource such as a token store).
        targets: [n, n_tiers] soft targets in [0, 1], NaN where unknown.
        report: filled with the steps taken, the mean loss of the last epoch (over every process) and
            the examples trained per second.
        starting_run: for a model continued from another run's weights, that run's key (see `run_key`).

    Returns:
        The trained model, on the CPU, in eval mode.
    """
    if placement is None:
        device = resolve_device(config.device)
        placement = Placement(device, resolve_precision(config.precision, device))
    place = placement
    device, world = place.device, place.world_size
    if device.type == "cpu":
        # Processes on one CPU share its cores: together they use `threads`, as one process would.
        torch.set_num_threads(max(1, config.threads // world))
    seed_everything(config.seed)
    if place.rank:
        torch.manual_seed(config.seed + 1_000_003 * place.rank)  # each process its own dropout masks
    if place.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    source = token_ids if isinstance(token_ids, TokenSource) else ListTokens(token_ids)
    lengths = source.lengths
    steps_per_epoch = math.ceil(len(source) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    last_step = min(total_steps, config.max_steps) if config.max_steps else total_steps
    model.to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    fused = config.fused_optimizer if config.fused_optimizer is not None else device.type == "cuda"
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=True if fused else None)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    scaler = place.grad_scaler()
    step = 0
    checkpoint_path = work_dir / CHECKPOINT_FILE
    key = run_key(config, source, targets, starting_run=starting_run)
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        if state.get("run_key", key) != key:  # checkpoints written before the key existed resume as before
            raise PromptierError(
                f"{checkpoint_path} is the checkpoint of another run (other logs, examples or training settings), "
                f"so it cannot be resumed: delete {work_dir} to start afresh, or give another --work-dir")
        step = _resume(state, model, optimizer, scheduler, scaler, place, config.seed)
        if place.rank == 0:  # a rerun says it goes on where the last one stopped, not only by its progress bar
            log.info("resuming from %s at step %d of %d", checkpoint_path, step, total_steps)
    network: nn.Module = model
    if place.distributed:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    target_tensor = torch.tensor(targets, dtype=torch.float32)
    known_counts = np.count_nonzero(~np.isnan(targets), axis=1)
    model.train()
    progress = tqdm(total=last_step, initial=step, desc=description, unit="step", dynamic_ncols=True,
                    disable=not place.is_main)
    first_step, started, examples = step, time.perf_counter(), 0
    epoch_loss = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of global-batch losses, steps)
    while step < last_step:
        epoch, offset = divmod(step, steps_per_epoch)
        if offset == 0:
            epoch_loss.zero_()
        batches = epoch_batches(lengths, config.batch_size, config.seed, epoch)
        for batch in batches[offset:]:
            if step >= last_step:
                break
            mine, weight = shard(batch, place.rank, world) if place.distributed else (batch, 1.0)
            examples += len(batch)
            input_ids, mask = _pad(source.batch(mine))
            batch_targets = target_tensor[mine].to(device, non_blocking=True)
            with place.autocast():
                logits = network(input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            if place.distributed:
                loss = sharded_bce(logits.float(), batch_targets, weight, int(known_counts[batch].sum()), world)
            else:
                loss = masked_bce(logits.float(), batch_targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
            scheduler.step()
            step += 1
            # A shard's loss is its part of the global batch's (summed over processes when reported).
            epoch_loss += torch.stack([loss.detach().double() / world, loss.new_tensor(1.0 / world).double()])
            progress.update(1)
            if step % 50 == 0 or step == last_step:
                reported = _reduced(epoch_loss, place)
                progress.set_postfix(loss=f"{reported[0] / max(reported[1], 1):.4f}", epoch=epoch)
            if step % config.checkpoint_every == 0 or step == last_step:
                _checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, step, place, key)
    progress.close()
    reported = _reduced(epoch_loss, place)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if report is not None:
        report.update(run_key=key, steps=step, steps_this_run=step - first_step, seconds=round(seconds, 3),
                      examples_per_second=round(examples / seconds, 1) if seconds > 0 else None,
                      train_loss=round(reported[0] / reported[1], 6) if reported[1] else None,
                      **place.describe())
    model.eval()
    return model.to("cpu")


def _reduced(values: torch.Tensor, place: Placement) -> list[float]:
    """`values` summed over every process (a collective: every process must call it at the same step)."""
    if not place.distributed:
        return values.tolist()
    import torch.distributed as dist

    total = values.clone()
    dist.all_reduce(total)
    return total.tolist()


def _resume(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
            place: Placement, seed: int) -> int:
    """Load a checkpoint's weights, optimizer, schedule and random state; return its step.

    Each process gets back its own random state when the checkpoint was written by as many
    processes on the same kind of device; otherwise the processes are reseeded from (seed, step).
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    rank_states = state.get("rank_rng")
    if not place.distributed and "rank_rng" not in state:
        torch.set_rng_state(state["torch_rng"])
    elif isinstance(rank_states, list) and len(rank_states) == place.world_size:
        torch.set_rng_state(rank_states[place.rank])
    else:
        torch.manual_seed(seed + 1_000_003 * place.rank + step)
    cuda_states = state.get("cuda_rng")
    if place.device.type == "cuda" and isinstance(cuda_states, list) and len(cuda_states) == place.world_size:
        torch.cuda.set_rng_state(cuda_states[place.rank], place.device)
    return step


def _checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None, step: int,
                place: Placement, key: str) -> None:
    """Write a checkpoint from the main process, with every process's random state and the run's key."""
    extra: dict = {"run_key": key}
    if scaler is not None:
        extra["scaler"] = scaler.state_dict()
    cuda_rng = torch.cuda.get_rng_state(place.device) if place.device.type == "cuda" else None
    if place.distributed:
        import torch.distributed as dist

        gathered: list = [None] * place.world_size
        dist.all_gather_object(gathered, (torch.get_rng_state(), cuda_rng))
        extra["rank_rng"] = [cpu for cpu, _ in gathered]
        if cuda_rng is not None:
            extra["cuda_rng"] = [cuda for _, cuda in gathered]
    elif cuda_rng is not None:
        extra["cuda_rng"] = [cuda_rng]
    if place.is_main:
        _save_checkpoint(path, model, optimizer, scheduler, step, extra)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by training (or a bare state dict) onto the CPU.

    A checkpoint is a pickle, and unpickling can run code; only tensors, numbers, strings and plain
    containers are read (torch's weights_only), which is all a checkpoint holds (the RNG state is a
    tensor).

    Raises:
        PromptierError: the file holds anything else, so it is refused unread; or it is cut short or
            damaged (a disk that filled, a copy that stopped), which the message names with its remedy.
    """
    if path.is_dir():
        raise PromptierError(f"{path} is a directory: give the checkpoint file in it (checkpoint.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PromptierError(f"{path} holds objects other than tensors, numbers and containers: refused, since "
                             f"loading it could run code. Use checkpoints written by promptier train.") from exc
    except FileNotFoundError:
        raise
    # RuntimeError, EOFError, BadZipFile: torch's zip reader on a cut file; KeyError: on a file that was never one
    except (RuntimeError, EOFError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise PromptierError(f"{path} cannot be read: it is cut short or damaged ({type(exc).__name__}). Delete it "
                             "(in a run's work dir: delete the work dir to train afresh), or restore it") from exc
    if not isinstance(state, dict):
        raise PromptierError(f"{path} is not a checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def add_to_checkpoint(path: Path, **entries: object) -> None:
    """Write `entries` (tensors and plain data) into the checkpoint at `path`, atomically: what the finished
    run computed after its last step (e.g. the familiarity statistics) and a re-export needs."""
    state = load_checkpoint(path)
    state.update(entries)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, extra: dict | None = None) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        **(extra or {}),
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
    device = next(model.parameters()).device
    order = np.argsort([len(x) for x in token_ids], kind="stable")
    outputs: list[np.ndarray] = []
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=description is None):
        batch = order[start : start + batch_size]
        input_ids, mask = _pad([token_ids[i] for i in batch])
        outputs.append(function(input_ids.to(device), mask.to(device)).float().cpu().numpy())
    logits = np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
    result = np.empty_like(logits)
    result[order] = logits
    return result
