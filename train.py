"""Train a GPT preset: `python train.py` on one process, `torchrun --nproc_per_node N train.py` for DDP
(gloo on CPU, nccl on CUDA), `--fsdp` to shard the model and optimizer over the ranks (FSDP2; checkpoints
become torch.distributed.checkpoint directories). Defaults train `tiny` on the embedded Shakespeare corpus.

  python train.py --preset tiny --time-budget 10
  torchrun --nproc_per_node 2 train.py --preset tiny --max-steps 200
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py --fsdp ...
  python train.py --run-name tiny --resume --more-steps 50     # 50 more steps of a finished run

The run's parts are built once by training.py (settings, data, model and optimizer); this file is the loop.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoint import CheckpointError, clean_run_dir, clean_state_dict, save_checkpoint, save_sharded
from config import DTYPES, ArgumentParser, ModelConfig, add_model_args, add_runtime_args, exit_with_error, positive
from distributed import setup_distributed
from engine import generate
from evaluate import evaluate
from machine import MACHINE, peak_matmul_flops, prepare_process
from model import GPT
from optim import lr_at
from tokenizer import Tokenizer
from training import (
    Settings,
    UsageError,
    agree_on_machine,
    build_data,
    build_model_and_optimizer,
    explicit_args,
    flops_per_token,
    model_and_tokenizer,
    resolve_settings,
)

SAMPLE_PROMPT = "ROMEO.\n"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--run-name", default=None, help="checkpoints go in checkpoints/RUN_NAME (default: preset)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare', local .txt/.jsonl/.parquet, or a hub name")
    p.add_argument("--data-mode", choices=["prepare", "stream"], default="prepare")
    p.add_argument("--data-dir", default="data", help="cache for corpora, tokenizers and token shards")
    p.add_argument("--text-field", default="text")
    p.add_argument("--val-docs", type=positive(int), default=500, help="validation documents (non-Shakespeare corpora)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train one on the train split)")
    p.add_argument("--max-steps", type=positive(int), default=None,
                   help="optimizer steps (default 2000, or as many as fit --time-budget)")
    p.add_argument("--time-budget", type=positive(float), default=None,
                   help="minutes of wall-clock training; the schedule follows the elapsed fraction of it")
    p.add_argument("--more-steps", type=positive(int), default=0,
                   help="with --resume: train N more steps (at the final learning rate past the schedule's end)")
    p.add_argument("--stop-at", type=positive(int), default=None,
                   help="save and exit after this step, schedule unchanged (for fixed-length job slots)")
    p.add_argument("--tokens-per-step", type=positive(int), default=None,
                   help="tokens per optimizer step (default 100k; 4096 for tiny)")
    p.add_argument("--micro-batch", type=positive(int), default=16)
    p.add_argument("--batch-ramp", type=positive(int, zero=True), default=None,
                   help="the first N steps take half the tokens per step (half the micro-steps): a smaller batch "
                        "early (default 0: none)")
    p.add_argument("--doc-chunks", action=argparse.BooleanOptionalAction, default=None,
                   help="training windows lie within one document each, the first at its start, instead of "
                        "running across documents (prepared data; default: off)")
    p.add_argument("--seq-len", type=positive(int), default=None, help="default: the model's max_seq_len")
    p.add_argument("--lr", type=positive(float), default=None, help="peak learning rate (default 5e-4; 4e-3 for tiny)")
    p.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="muon: Muon for the hidden matrices, AdamW for embedding, head and norms "
                        "(default: muon for tiny, adamw otherwise)")
    p.add_argument("--muon-lr", type=positive(float), default=None,
                   help="Muon's peak learning rate (default: --lr; its update is scaled to AdamW's RMS)")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default=None,
                   help="cosine decay, or warmup-stable-decay: flat, then linear to min_lr over --decay-frac "
                        "(default: wsd for tiny, cosine otherwise)")
    p.add_argument("--decay-frac", type=positive(float), default=0.3, help="wsd: the final fraction that decays")
    p.add_argument("--warmup-frac", type=positive(float), default=0.05, help="warmup, as a fraction of the run")
    p.add_argument("--warmup-steps", type=positive(int), default=None,
                   help="warmup in steps instead of --warmup-frac (runs without --time-budget)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA (fp16 without bf16 support); on a CPU, fp32 or bf16, "
                        "whichever trains this run's shape faster here (timed once, kept in .cache/machine)")
    p.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model; auto = where it trains this run's shape faster on this CPU "
                        "(timed with --dtype; off on CUDA). --compile alone is on")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over the ranks, block by block (FSDP2), "
                        "for models that outgrow DDP; saves last.dcp/best.dcp, which resume on any number of ranks")
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/RUN_NAME/last.ckpt")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume if last.ckpt exists, else start (for restarts by torchrun or a scheduler)")
    p.add_argument("--eval-every", type=positive(int), default=100)
    p.add_argument("--save-every", type=positive(int), default=100)
    p.add_argument("--log-every", type=positive(int), default=10)
    p.add_argument("--peak-flops", type=positive(float), default=None,
                   help="device peak FLOP/s for MFU (default: timed)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="checkpoints")
    add_runtime_args(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        prepare_process(args.machine)
        train(args, explicit_args(parser, argv))
    except UsageError as e:
        if args.debug:
            raise
        parser.error(str(e))
    except (data.DataError, CheckpointError, ValueError, OSError) as e:
        exit_with_error(e, args.debug)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, explicit: dict) -> None:
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    run_dir = Path(args.out_dir) / (args.run_name or args.preset)
    if master and run_dir.is_dir():
        clean_run_dir(run_dir)
    s, ckpt = resolve_settings(args, explicit, run_dir, device)
    if s.fsdp and not dist.is_initialized():  # FSDP2 needs a process group, even a group of one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    cfg, tok = model_and_tokenizer(s, ckpt, rank)
    accum = max(1, round(s.tokens_per_step / (s.micro_batch * s.seq_len * world)))
    s = agree_on_machine(s, cfg, device, accum)
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    loader, val_chunks, byte_lengths = build_data(s, tok, rank, world, accum, ckpt)
    raw_model, model, opt = build_model_and_optimizer(s, cfg, device, ckpt)
    dtype = DTYPES[s.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    torch.set_float32_matmul_precision("high")
    history = {"train": [], "val": [], "val_bpb": [], "val_elapsed_s": [], "lr": []} | (ckpt["history"] if ckpt else {})
    best_val = ckpt["best_val"] if ckpt else float("inf")
    if ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
    tokens_per_step = s.micro_batch * s.seq_len * accum * world

    def tokens_at(step: int) -> int:  # trained before step `step` (a --batch-ramp run's first steps are smaller)
        return loader.rows_before(step) * s.seq_len if s.batch_ramp else step * tokens_per_step
    meter = Meter(s, device, dtype, flops_per_token(cfg, s.seq_len, raw_model.num_params()), tokens_at, world)
    step, elapsed = (ckpt["step"], ckpt.get("elapsed_s", 0.0)) if ckpt else (0, 0.0)  # a resumed run goes on
    budget_s = s.time_budget * 60 if s.time_budget else None
    if master:
        print(f"model: {raw_model.num_params():,} parameters  config: {cfg.to_dict()}")
        until = f"{s.time_budget:g} min of training" if budget_s else f"step {s.max_steps}"
        print(f"train: world {world} x micro-batch {s.micro_batch} x seq {s.seq_len} x accum {accum} = "
              f"{tokens_per_step:,} tokens/step, from step {step} to {until}, device {device}, {s.dtype}"
              f"{', compiled' if s.compile == 'on' else ''}")
        print(f"machine: {MACHINE.describe()}")
        print("args: " + " ".join(f"{k}={v}" for k, v in sorted(vars(s).items())))

    def payload() -> dict:  # collective in stream mode (each rank's stream position): every rank builds it
        # A sharded run's model and optimizer are saved apart, by every rank (save_sharded).
        weights = {} if s.fsdp else {"model": clean_state_dict(raw_model), "optimizer": opt.state_dict()}
        data_state = None
        if s.data_mode == "stream":
            data_state = [None] * world
            if dist.is_initialized():
                dist.all_gather_object(data_state, loader.state_dict())
            else:
                data_state = [loader.state_dict()]
        return weights | {"config": cfg.to_dict(),
                "tokenizer": tok.to_str(), "eos_token": tok.hf.id_to_token(tok.eos_id),
                "chat_template": tok.chat_template, "step": step, "elapsed_s": elapsed, "train_args": vars(s),
                "data_state": data_state, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "history": history, "best_val": best_val}

    signals = {"got": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: signals.update(got=signum))
    # A budget run's bar counts seconds of the budget; a step run's counts steps.
    bar = tqdm(total=round(budget_s) if budget_s else s.max_steps, initial=round(elapsed) if budget_s else step,
               disable=not master, unit="s" if budget_s else "step", dynamic_ncols=True)
    t_begin, step_times = time.perf_counter() - elapsed, []  # each step's seconds (the slowest rank's)
    try:  # the bar is closed on every way out, so that an error message starts on its own line
        while s.max_steps is None or step < s.max_steps:
            # Every rank has the same clock (reduced below), so all take the same learning rate. A budget run's
            # last step is the first expected to end past the budget; it runs at min_lr.
            if budget_s:
                expected_s = sorted(step_times[-5:])[len(step_times[-5:]) // 2] if step_times else 0.0
                progress = 1.0 if elapsed + expected_s >= budget_s else elapsed / budget_s
            else:
                progress = (step + 1) / s.decay_steps
            lr = lr_at(progress, s)
            for group in opt.param_groups:  # Muon's groups are those with Newton-Schulz steps
                group["lr"] = lr * ((s.muon_lr or s.lr) / s.lr if "ns_steps" in group else 1)
            t_step = time.perf_counter()
            step_accum = loader.accum_at(step) if s.batch_ramp else accum
            train_loss = optimizer_step(model, raw_model, opt, scaler, loader, autocast, step_accum, s, device)
            if not math.isfinite(train_loss):
                raise ValueError(f"a non-finite loss or gradient at step {step + 1}; stopped without saving, so "
                                 f"{run_dir}/last.ckpt keeps the last good state; lower --lr, then --resume")
            t_step_end = time.perf_counter()
            step += 1
            history["train"].append((step, train_loss))
            history["lr"].append((step, lr))
            # One collective a step: a signal on any rank, and the slowest rank's clock and step time.
            clock = torch.tensor([float(signals["got"] is not None), t_step_end - t_begin, t_step_end - t_step],
                                 dtype=torch.float64, device=device)
            if dist.is_initialized():
                dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            interrupted, elapsed = bool(clock[0]), clock[1].item()
            step_times.append(clock[2].item())
            bar.update(round(elapsed) - bar.n if budget_s else 1)
            bar.set_postfix(step=step, loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
            if step % s.log_every == 0 and master:
                bar.write(meter.line(step, train_loss, lr, elapsed))
            last = (budget_s and progress >= 1) or step == s.max_steps or step == s.stop_at
            evaluating = (step % s.eval_every == 0 or last) and not interrupted
            saving = step % s.save_every == 0 or last or interrupted
            improved = False
            if evaluating:  # every rank gets the same (all-reduced) figures
                # Evaluation runs uncompiled (its batches would each compile), except under FSDP (collective).
                val_loss, bpb = evaluate(model if s.fsdp else raw_model, val_chunks, byte_lengths, s.micro_batch,
                                         autocast, rank, world, device)
                history["val"].append((step, val_loss))
                history["val_bpb"].append((step, bpb))
                history["val_elapsed_s"].append((step, elapsed))
                improved, best_val = val_loss < best_val, min(best_val, val_loss)
            state = payload() if saving or improved else None
            sampler = full_model(model, cfg) if s.fsdp and evaluating else raw_model  # collective under FSDP
            if master and evaluating:
                bar.write(f"step {step}: val loss {val_loss:.4f}  val bits/byte {bpb:.4f}  "
                          f"| {sample(sampler, tok)!r}")
                plot_losses(history, run_dir / "loss.png")
            if s.fsdp:
                if improved:
                    save_sharded(run_dir / "best.dcp", model, opt, state | {"val_bpb": bpb})
                if saving:
                    save_sharded(run_dir / "last.dcp", model, opt, state)
            elif master:
                if improved:
                    save_checkpoint(run_dir / "best.ckpt", state | {"val_bpb": bpb})
                if saving:
                    save_checkpoint(run_dir / "last.ckpt", state)
            if interrupted:
                if master:
                    print(f"interrupted at step {step}; saved {run_dir}/last.ckpt; continue with --resume",
                          file=sys.stderr)
                sys.exit(130 if signals["got"] == signal.SIGINT else 143)
            if last:
                if step == s.stop_at and step != s.max_steps and master:
                    bar.write(f"stopping at step {step} (--stop-at); continue with --resume")
                break
            meter.pause(time.perf_counter() - t_step_end)  # evals and saves do not count against tokens/s
    finally:
        bar.close()
    if master:
        plot_losses(history, run_dir / "loss.png")
        val = f"val loss {history['val'][-1][1]:.4f}, val bits/byte {history['val_bpb'][-1][1]:.4f}, " \
            if history["val_bpb"] else ""
        print(f"done: {step} steps, {tokens_at(step):,} tokens in {elapsed / 60:.1f} min of training, "
              f"{val}checkpoints in {run_dir}/")
    if dist.is_initialized():
        dist.barrier()


def optimizer_step(model, raw_model: GPT, opt, scaler, loader, autocast, accum: int, s: Settings,
                   device: torch.device) -> float:
    """One optimizer step over accum micro-batches; the mean loss over them and the ranks, or NaN (and no
    update) when the loss or the gradient is not finite (fp16's GradScaler skips such steps itself)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for micro in range(accum):
        x, y = (t.to(device) for t in loader.next_batch())
        # No gradient all-reduce (DDP) or reduce-scatter (FSDP) until the last micro-step; under DDP the forward
        # must be inside no_sync too.
        if s.fsdp:
            model.set_requires_gradient_sync(micro == accum - 1)
        with model.no_sync() if ddp and micro < accum - 1 else nullcontext():
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), s.grad_clip)
    if s.fsdp:
        grad_norm = grad_norm.full_tensor()  # a DTensor, the same on every rank
    if dist.is_initialized():
        dist.all_reduce(loss_sum)  # gloo has no AVG
    train_loss = loss_sum.item() / accum / world
    if not math.isfinite(train_loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm.item())):
        return float("nan")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return train_loss


class Meter:
    """Tokens/s and MFU between log lines, against a peak FLOP rate timed at start-up (or --peak-flops). A step
    that beats the peak (timed in a busy moment) makes it time the peak again, and say so."""

    def __init__(self, s: Settings, device: torch.device, dtype: torch.dtype, flops_per_token: float,
                 tokens_at, world: int):
        self.s, self.device, self.dtype, self.world = s, device, dtype, world
        self.flops_per_token, self.tokens_at = flops_per_token, tokens_at
        self.peak = s.peak_flops or peak_matmul_flops(device, dtype)
        self.since = time.perf_counter()

    def pause(self, seconds: float) -> None:
        self.since += seconds

    def line(self, step: int, loss: float, lr: float, elapsed: float) -> str:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        tokens = self.tokens_at(step) - self.tokens_at(step - self.s.log_every)
        tps, self.since = tokens / (now - self.since), now
        flops = self.flops_per_token * tps / self.world
        note = ""
        if flops > self.peak:  # the start-up timing was too low (a busy moment): time it again
            self.peak = max(peak_matmul_flops(self.device, self.dtype), flops)
            note = f"note: this step beat the measured peak, so it was re-measured: {self.peak / 1e9:,.0f} GFLOP/s\n"
        return (f"{note}step {step}: loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s MFU {100 * flops / self.peak:.1f}% | "
                f"{self.tokens_at(step):,} tokens in {elapsed / 60:.1f} min")


def full_model(sharded: torch.nn.Module, cfg: ModelConfig) -> GPT | None:
    """Collective: the whole model, gathered from the shards, on rank 0 (None elsewhere), to sample from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    model = GPT(cfg)
    model.load_state_dict(state)
    return model


def sample(model: GPT, tok: Tokenizer, max_new_tokens: int = 48) -> str:
    prompt = tok.encode(SAMPLE_PROMPT)
    was_training = model.training
    model.eval()
    rows, _ = generate(model, [prompt], min(max_new_tokens, model.config.max_seq_len - len(prompt)),
                       temperature=0.8, top_k=50, eos_id=tok.eos_id, seed=0)
    model.train(was_training)
    return SAMPLE_PROMPT + tok.decode(rows[0])


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        ax.plot(*zip(*history["train"]), label="train", alpha=0.8)
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)  # a full disk leaves the old plot, never a torn one
    except OSError:
        tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
