"""Seconds per image and peak memory of a 256x256, 30-step, CFG text-to-image generation.

Full-size models with random weights (no downloads), ours against the reference stack
(PyPI ``diffsynth``) when it is installed, printed side by side with the ratio.

    python -m benchmarks.generate_speed                              # CPU, float32
    python -m benchmarks.generate_speed --device cuda --dtype bfloat16

Each side runs in its own process, so the CPU's peak-RSS figures do not mix.

The reference run uses diffsynth's own scheduler, VAE and attention, encodes the two prompts
separately and calls the DiT twice per step at batch 1, exactly as its pipeline does
(``docs/diffsynth-aaa.md`` section 8). Its DiT class lives in the tutorial
script, not in the package: pass that file with ``--reference-script train_from_scratch.py`` to
time the reference DiT itself; otherwise our numerically identical AAADiT stands in for it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import resource
import subprocess
import sys
import time

import torch

from aaa_core.devices import resolve_device, resolve_dtype
from aaa_core.dit import AAADiT
from aaa_core.pipeline import AAAPipeline, GenerationSettings
from aaa_core.text_encoder import Qwen3TextEncoder, build_empty_model, load_config, load_tokenizer
from aaa_core.vae import Flux2VAE

PROMPT = "a green lizard pokemon with a plant bulb on its back"


def randomize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Materialises a meta-device model with small random weights (timing needs no real ones)."""
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02) if tensor.ndim > 1 else tensor.fill_(1.0 if "norm" in name or "var" in name else 0.0)
    return model.to(dtype).eval().requires_grad_(False)


def random_pipeline(device: torch.device, dtype: torch.dtype) -> AAAPipeline:
    with torch.device("meta"):
        dit, vae = AAADiT(), Flux2VAE()
        qwen = build_empty_model(load_config())
    qwen = randomize(qwen, device, dtype)
    qwen.rotary_emb.inv_freq = qwen.rotary_emb.original_inv_freq.to(device)  # a buffer not in the weights
    return AAAPipeline(Qwen3TextEncoder(qwen, load_tokenizer()), randomize(dit, device, dtype), randomize(vae, device, dtype))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` runs after one warm-up, and the peak memory (GiB) seen."""
    fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS high-water mark
    return best, peak


# --------------------------------------------------------------------------------------
# The reference pipeline's inference loop, on diffsynth's components
# --------------------------------------------------------------------------------------


def reference_runner(pipe: AAAPipeline, settings: GenerationSettings, script: str | None):
    """Returns a function that generates one image the way diffsynth's AAAImagePipeline does."""
    from diffsynth.diffusion import FlowMatchScheduler
    from diffsynth.diffusion.base_pipeline import BasePipeline
    from diffsynth.models.flux2_vae import Flux2VAE as ReferenceVAE

    device, dtype = pipe.device, pipe.dtype
    helper = BasePipeline(device=device, torch_dtype=dtype)
    vae = ReferenceVAE().to(device=device, dtype=dtype).eval()
    vae.load_state_dict(pipe.vae.state_dict())
    dit = copy.copy(pipe.dit)  # same weights; does all the work the tutorial's DiT does
    dit.last_block_image_only = False
    if script:
        spec = importlib.util.spec_from_file_location("reference_tutorial", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        dit = module.AAADiT().to(device=device, dtype=dtype).eval()
        dit.load_state_dict(pipe.dit.state_dict())
    tokenizer, qwen = pipe.text_encoder.tokenizer, pipe.text_encoder.model

    def encode(prompt: str) -> torch.Tensor:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        inputs = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=128).to(device)
        return qwen(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]

    @torch.inference_mode()
    def generate():
        scheduler = FlowMatchScheduler("FLUX.2")
        h, w = settings.height // 16, settings.width // 16
        scheduler.set_timesteps(settings.steps, dynamic_shift_len=h * w)
        posi, nega = encode(settings.prompt), encode(settings.negative_prompt)
        latents = helper.generate_noise((1, 128, h, w), seed=settings.seed, rand_device="cpu", rand_torch_dtype=dtype)
        for i, timestep in enumerate(scheduler.timesteps):
            t = timestep.unsqueeze(0).to(dtype=dtype, device=device)
            p, n = dit(latents, posi, t), dit(latents, nega, t)
            latents = scheduler.step(n + settings.cfg * (p - n), scheduler.timesteps[i], latents)
        return helper.vae_output_to_image(vae.decode(latents))

    return generate


def measure(args: argparse.Namespace) -> None:
    """Times one side (``args.only``) in this process and prints one line."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    pipe = random_pipeline(device, dtype)
    settings = GenerationSettings(prompt=PROMPT, steps=args.steps, cfg=10.0, width=args.size, height=args.size)
    if args.only == "ours":
        print(f"device {device}, {dtype}, {args.size}x{args.size}, {args.steps} steps, cfg 10, "
              f"{torch.get_num_threads()} CPU threads", flush=True)
        seconds, peak = timed(lambda: pipe.generate(settings), device, args.repeats)
        which = ""
    else:
        seconds, peak = timed(reference_runner(pipe, settings, args.reference_script), device, args.repeats)
        which = "  (tutorial AAADiT)" if args.reference_script else "  (our AAADiT called as the reference calls it)"
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    print(f"{args.only + ':':10s} {seconds:8.2f} s/image   {memory} {peak:.2f} GiB{which}", flush=True)
    print(f"RESULT {seconds}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPUs and on CPUs with native bf16, else float32 on the CPU")
    parser.add_argument("--steps", type=int, default=30, help="Euler steps per image (default: 30)")
    parser.add_argument("--size", type=int, default=256, help="square image side in pixels, a multiple of 16 (default: 256)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the best is kept (default: 2)")
    parser.add_argument("--reference-script", help="DiffSynth's train_from_scratch.py, to time its own AAADiT class")
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    parser.add_argument("--only", choices=["ours", "reference"], help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.only:
        return measure(args)

    sides = ["ours"]
    if args.no_reference or importlib.util.find_spec("diffsynth") is None:
        print("reference: skipped (pip install diffsynth to compare)")
    else:
        sides.append("reference")
    results = {}
    for side in sides:
        out = subprocess.run([sys.executable, "-m", "benchmarks.generate_speed", *sys.argv[1:], "--only", side],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT")))
        results[side] = float(out.rsplit("RESULT ", 1)[1])
    if "reference" in results:
        print(f"speed-up:   {results['reference'] / results['ours']:8.2f}x")


if __name__ == "__main__":
    main()
