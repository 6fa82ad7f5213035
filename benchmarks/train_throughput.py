"""Training throughput at 256x256 for the full-size AAADiT: our trainer's step against the reference's.

    python -m benchmarks.train_throughput                                   # CPU: batch 4, 3 timed steps
    python -m benchmarks.train_throughput --device cuda --batch-size 32 --steps 20 --warmup 5

Ours: the trainer's own step on cached inputs (``training.loss`` on stored latents and prompt
embeddings, a real batch with one timestep per sample, bf16 autocast with float32 master weights
on GPU / float32 on CPU, AdamW, the EMA update).

Reference: DiffSynth-Studio's tutorial step (``docs/diffsynth-aaa.md`` sections 1,
3 and 10) at batch 1: a Qwen3-0.6B forward on the 128-token prompt, a VAE encode at 256x256, the
DiT forward/backward with ``FlowMatchScheduler`` noise and weights, AdamW and ConstantLR, all
in pure bf16 on GPU (float32 on CPU, like ours there; ``--cpu-bf16`` runs both in bf16 there
too). Needs ``diffsynth``.

On a CPU both are compute-bound, so the speed-up is about the FLOP ratio: the reference spends
650 GFLOP per image (DiT 261 + VAE encoder 273 + Qwen3 116, section 4.4), ours 261, i.e. 2.5x.
On a GPU the reference is also latency-bound (batch 1, three models per step) and the gap is
much larger.

Weights are random (throughput does not depend on them). Each variant runs in its own process,
so its peak memory is its own (GPU: max allocated; CPU: max resident set); the variants run one
after the other. A step is timed to its end (GPU synchronised); steps/s is 1 / the median step
time. A shared or throttled machine can drift by 2x within minutes: on one, run it twice.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import logging
import multiprocessing
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from aaa_core.dit import AAADiT
from training.metrics import peak_flops

log = logging.getLogger("benchmark")

RESOLUTION = 256
TEXT_TOKENS = 128
CACHED_SAMPLES = 151  # the Pokemon data set
PROMPT = "green, lizard, plant, Grass, Poison, seed on back, red eyes"


def ours(args: argparse.Namespace, device: torch.device):
    """Returns (step function, samples per step, model) for the trainer's step."""
    from training.batches import BatchOrder
    from training.loss import draw_noise, flow_matching_loss, step_generator
    from training.train import update_ema
    from aaa_core.scheduler import TrainingSchedule

    cuda = device.type == "cuda"
    bf16 = cuda or args.cpu_bf16
    with torch.device(device):
        model = AAADiT()
        latents = torch.randn(CACHED_SAMPLES, 128, RESOLUTION // 16, RESOLUTION // 16, dtype=torch.bfloat16 if bf16 else torch.float32)
        text = torch.randn(CACHED_SAMPLES, TEXT_TOKENS, 1024, dtype=latents.dtype)
    model.gradient_checkpointing = args.gradient_checkpointing
    if args.compile:
        for block in model.blocks:
            block.compile()
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01, fused=cuda)
    schedule = TrainingSchedule.flux2()
    schedule = dataclasses.replace(schedule, sigmas=schedule.sigmas.to(device), weights=schedule.weights.to(device))
    order = BatchOrder(torch.zeros(CACHED_SAMPLES, dtype=torch.long), args.batch_size, 0, 1, 0, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    counter = iter(range(10**9))

    def step() -> None:
        micro = next(counter)
        batch = order.indices(micro)
        x0, embeds = latents[batch].float(), text[batch]
        indices, noise = draw_noise(x0, 1000, step_generator(0, micro, 0, device))
        with autocast:
            loss = flow_matching_loss(model, x0, embeds, indices, noise, schedule).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, 0.999)

    return step, args.batch_size, model


def reference(args: argparse.Namespace, device: torch.device):
    """Returns (step function, 1, model) for the DiffSynth tutorial's step."""
    from diffsynth.diffusion import FlowMatchScheduler
    from transformers import Qwen3Model

    from aaa_core.text_encoder import Qwen3TextEncoder, load_config, load_tokenizer
    from aaa_core.vae import Flux2VAE

    dtype = torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 else torch.float32  # pure bf16: no master weights
    with torch.device(device):
        text_encoder = Qwen3TextEncoder(Qwen3Model(load_config()).to(dtype).eval().requires_grad_(False), load_tokenizer())
        vae = Flux2VAE().to(dtype).eval().requires_grad_(False)
        model = AAADiT().to(dtype)
        model.last_block_image_only = False  # the tutorial's DiT does all the work
        pixels = torch.rand(1, 3, RESOLUTION, RESOLUTION, dtype=dtype) * 2 - 1  # the DataLoader's workers make these
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
    lr_scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)
    scheduler = FlowMatchScheduler("FLUX.2")
    scheduler.set_timesteps(1000, training=True)

    def step() -> None:
        with torch.no_grad():
            prompt_embeds = text_encoder.encode([PROMPT])
            x0 = vae.encode(pixels)
        timestep = scheduler.timesteps[torch.randint(0, 1000, (1,))].to(dtype=dtype, device=device)
        noise = torch.randn_like(x0)
        noisy = scheduler.add_noise(x0, noise, timestep)
        target = scheduler.training_target(x0, noise, timestep)
        prediction = model(noisy, prompt_embeds, timestep)
        loss = F.mse_loss(prediction.float(), target.float()) * scheduler.training_weight(timestep)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    return step, 1, model


VARIANTS = {"ours": ours, "reference": reference}


def worker(name: str, args: argparse.Namespace, conn) -> None:
    """One variant in its own process: builds it, then runs one step per "step" message and reports its time."""
    try:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        torch.manual_seed(0)
        step, samples_per_step, model = VARIANTS[name](args, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        conn.send("ready")
        while (message := conn.recv()) != "done":
            if message == "reset_memory" and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if isinstance(message, int):  # run that many steps back to back, report each one's time
                times = []
                for _ in range(message):
                    start = time.perf_counter()
                    step()
                    sync()
                    times.append(time.perf_counter() - start)
                conn.send(times)
        if device.type == "cuda":
            peak_memory = torch.cuda.max_memory_allocated()
        else:
            peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        conn.send({
            "batch": samples_per_step, "peak_memory": peak_memory,
            "flops_per_step": 3 * model.flops_per_forward((RESOLUTION // 16) ** 2, TEXT_TOKENS) * samples_per_step,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        })
    except Exception as err:  # the parent prints it and stops
        conn.send(f"{name} failed: {type(err).__name__}: {err}")


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Builds one variant in a fresh process, runs its warm-up and timed steps back to back, ends it.

    One variant at a time: on a small VM even an idle second process holding the other model
    slowed the running one by ~10% (page reclaim), which a real training run never sees.
    """
    context = multiprocessing.get_context("spawn")  # a fresh process (and CUDA context) per variant
    parent, child = context.Pipe()
    process = context.Process(target=worker, args=(name, args, child), daemon=True)
    process.start()

    def ask(message):
        parent.send(message)
        answer = parent.recv()
        if isinstance(answer, str):
            raise RuntimeError(answer)
        return answer

    try:
        if (answer := parent.recv()) != "ready":
            raise RuntimeError(answer)
        log.info("%s: warm-up steps %s s", name, ", ".join(f"{t:.2f}" for t in ask(args.warmup)))
        parent.send("reset_memory")
        times = ask(args.steps)
        log.info("%s: timed steps %s s", name, ", ".join(f"{t:.2f}" for t in times))
        result = ask("done")
        result["step_seconds"] = statistics.median(times)  # robust to one disturbed step
        return result
    finally:
        process.join(timeout=30)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, help="our batch size (default: 32 on GPU, 4 on CPU); the reference's is 1")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on GPU, 2 on CPU)")
    parser.add_argument("--only", choices=["ours", "reference"], help="run one variant")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="leave out our EMA update")
    parser.add_argument("--compile", action="store_true", help="torch.compile our DiT blocks")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="our DiT recomputes activations")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="on the CPU too, ours with bf16 autocast and the reference in pure bf16 (fast with AVX512-BF16 or AMX)")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="peak bf16 FLOP/s for MFU (default: looked up)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's choice)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (32 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = max(1, args.warmup if args.warmup is not None else (5 if gpu else 2))

    names = [args.only] if args.only else ["ours", "reference"]
    if "reference" in names:
        if importlib.util.find_spec("diffsynth") is None:
            log.warning("diffsynth is not installed: measuring ours only (pip install diffsynth==2.1.12)")
            names.remove("reference")
    results = {name: run_variant(name, args) for name in names}
    for r in results.values():
        r["steps_per_s"] = 1 / r["step_seconds"]
        r["images_per_s"] = r["steps_per_s"] * r["batch"]
        r["dit_flops"] = r["flops_per_step"] * r["steps_per_s"]

    peak = peak_flops(torch.device(args.device), args.peak_flops) if gpu else (args.peak_flops or None)
    first = next(iter(results.values()))
    bf16 = gpu or args.cpu_bf16
    precision = {"ours": "bf16 autocast, fp32 weights" if bf16 else "fp32", "reference": "pure bf16" if bf16 else "fp32"}
    print(f"\nAAADiT training throughput at {RESOLUTION}x{RESOLUTION}, full size (128.8M parameters, random weights), {first['device_name']}")
    print(f"{'variant':<44} {'batch':>5} {'steps/s':>8} {'images/s':>9} {'peak mem':>9} {'DiT TFLOP/s':>12} {'MFU':>6}")
    for name, r in results.items():
        label = f"{name} ({precision[name]}{', + text enc. + VAE per step' if name == 'reference' else ', cached inputs'})"
        mfu = f"{100 * r['dit_flops'] / peak:5.1f}%" if peak else "   n/a"
        print(f"{label:<44} {r['batch']:>5} {r['steps_per_s']:>8.3f} {r['images_per_s']:>9.3f} "
              f"{r['peak_memory'] / 2**30:>7.2f} G {r['dit_flops'] / 1e12:>12.3f} {mfu:>6}")
    if len(results) == 2:
        print(f"speed-up in images/s, ours / reference: {results['ours']['images_per_s'] / results['reference']['images_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
