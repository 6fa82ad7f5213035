"""AAADiT as a native MODEL inside ComfyUI's real executor: KSampler, custom sampling, LoRA, every sampler.

One ComfyUI process (the 2024 tree by default, `$AAA_COMFYUI_PATH` for another) runs every action
on tiny models. Latents come back through the built-in SaveLatent node and are compared here:
- the native KSampler workflow writes an image;
- SamplerCustom (both trees) and SamplerCustomAdvanced with AAA Reference Noise (trees that have
  it) give AAA Sampler's latents; where ComfyUI has Flux2Scheduler, it gives our sigmas' result;
- LoraLoaderModelOnly with a kohya LoRA (and a PEFT one with the ``diffusion_model.`` prefix where
  ComfyUI reads that layout), and AAA LoRA Loader with an unprefixed PEFT one, sample exactly like
  a DiT file holding W + strength * scale * B @ A merged by hand, in KSampler and in AAA Sampler;
- LoraLoaderModelOnly with a LoRA file as the trainer saves it samples exactly like the checkpoint
  ``python -m training.export`` merges from it;
- every sampler and scheduler name ComfyUI lists runs 2 steps and gives finite latents;
- conditioning from another text encoder (``comfyui_test_nodes.py`` makes it as ComfyUI's Anima
  encoder does) is a one-line error in every native sampler and in AAA Sampler.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from api_workflows import HEIGHT, STEPS, TINY_FILES, WIDTH, load_workflow
from comfyui_harness import comfyui_test_marks, execute, execute_each_choice, run_in_comfyui
from comfyui_test_nodes import ANIMA_KEYS
from pack_import import pack_module
from tiny_models import TINY_DIT, save_tiny_models

from aaa_core.checkpoint import save_safetensors
from aaa_core.dit import CONFIG_METADATA_KEY, load_dit
from training.export import export_lora
from training.cache import file_sha256
from training.lora import LoraRun

ROOT = Path(__file__).resolve().parents[1]

pytestmark = comfyui_test_marks()

LORA_STRENGTH, LORA_RANK, LORA_ALPHA = 0.7, 4, 2.0
LORA_TARGETS = ("blocks.0.to_q", "blocks.1.ff.2", "proj_out")  # attention, MLP and output layers
DEFAULT_SHIFT = pack_module("nodes.native_dit").flux2_shift()  # the model sampling's own default


# --------------------------------------------------------------------------------------
# LoRA files and the DiT files they should equal
# --------------------------------------------------------------------------------------


def lora_factors(seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A = down (rank, in), B = up (out, rank)) for the tiny DiT's target layers."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.to_q": (TINY_DIT.dim, TINY_DIT.dim), "blocks.1.ff.2": (TINY_DIT.dim, TINY_DIT.dim * TINY_DIT.ff_mult), "proj_out": (TINY_DIT.latent_channels, TINY_DIT.dim)}
    return {
        name: (torch.randn(LORA_RANK, shapes[name][1], generator=gen) * 0.3, torch.randn(shapes[name][0], LORA_RANK, generator=gen) * 0.3)
        for name in LORA_TARGETS
    }


def save_kohya_lora(path: Path, factors: dict) -> None:
    tensors = {}
    for name, (down, up) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(LORA_ALPHA)})
    save_file(tensors, str(path))


def save_peft_lora(path: Path, factors: dict, prefix: str) -> None:
    tensors = {}
    for name, (down, up) in factors.items():
        tensors.update({f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up})
    save_file(tensors, str(path))


def save_merged_dit(base: Path, path: Path, factors: dict, scale: float) -> None:
    """The base DiT with W + strength * scale * B @ A computed by hand."""
    state = load_file(str(base))
    for name, (down, up) in factors.items():
        state[f"{name}.weight"] = state[f"{name}.weight"] + LORA_STRENGTH * scale * (up @ down)
    save_safetensors(state, path, {CONFIG_METADATA_KEY: TINY_DIT.to_json()})


def save_trained_lora(base: Path, lora_path: Path, merged_path: Path) -> None:
    """A LoRA file as the trainer saves it (random adapters in place of trained ones), and its merge by the export."""
    torch.manual_seed(2)
    targets = ["to_q", "to_k", "to_v", "to_out", "ff.0", "ff.2", "proj_out"]
    lora = LoraRun(load_dit(base), base, file_sha256(base), LORA_RANK, LORA_ALPHA, targets, keep_base=False)
    with torch.no_grad():
        for param in lora.adapters.parameters():
            param.normal_(0.0, 0.3)
    lora.save(lora.adapters, lora_path, 1, "raw", torch.float32, "comfyui-test")
    export_lora(lora_path, merged_path, str(base), strength=1.0, dtype="fp32")


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------


def node_id_of(prompt: dict, class_type: str) -> str:
    return next(node_id for node_id, entry in prompt.items() if entry["class_type"] == class_type)


def save_latent(prompt: dict, samples: list, prefix: str) -> None:
    prompt[f"save_{prefix}"] = {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": f"latents/{prefix}"}}


def base_prompt(batch_size: int = 1) -> dict:
    """Loaders, prompts and an empty latent (from the custom-sampler workflow), with no outputs yet."""
    prompt = load_workflow("AAADiT custom sampler", "unused")
    for class_type in ("AAAReferenceNoise", "CFGGuider", "KSamplerSelect", "AAAFlux2Sigmas", "SamplerCustomAdvanced", "AAAVAEDecode", "SaveImage"):
        del prompt[node_id_of(prompt, class_type)]
    prompt[node_id_of(prompt, "AAAEmptyLatentImage")]["inputs"]["batch_size"] = batch_size
    return prompt


def links(prompt: dict) -> dict:
    """Sockets of the base prompt: model, positive, negative, latent."""
    encodes = [node_id for node_id, entry in prompt.items() if entry["class_type"] == "CLIPTextEncode"]
    positive, negative = sorted(encodes, key=lambda n: prompt[n]["inputs"]["text"] == " ")
    return {"model": [node_id_of(prompt, "AAADiTLoader"), 0], "positive": [positive, 0], "negative": [negative, 0], "latent_image": [node_id_of(prompt, "AAAEmptyLatentImage"), 0]}


def add_aaa_sampler(prompt: dict, name: str, model: list, seed: int = 3, steps: int = STEPS) -> list:
    sockets = links(prompt)
    prompt[name] = {"class_type": "AAASampler", "inputs": {**sockets, "model": model, "seed": seed, "steps": steps, "cfg": 4.0, "denoise": 1.0}}
    return [name, 0]


def add_ksampler(prompt: dict, name: str, model: list, sampler: str = "euler", scheduler: str = "simple") -> list:
    sockets = links(prompt)
    prompt[name] = {"class_type": "KSampler", "inputs": {
        **sockets, "model": model, "seed": 3, "steps": STEPS, "cfg": 4.0, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
    return [name, 0]


def add_sigmas(prompt: dict, name: str, steps: int = STEPS) -> list:
    prompt[name] = {"class_type": "AAAFlux2Sigmas", "inputs": {"steps": steps, "width": WIDTH, "height": HEIGHT, "denoise": 1.0}}
    return [name, 0]


def reference_vs_sampler_custom() -> dict:
    """Batch 1: ComfyUI's seeded noise for one image is the reference's, so SamplerCustom needs no NOISE node."""
    prompt = base_prompt()
    sockets = links(prompt)
    save_latent(prompt, add_aaa_sampler(prompt, "aaa", sockets["model"]), "ref1")
    prompt["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["custom"] = {"class_type": "SamplerCustom", "inputs": {
        **sockets, "add_noise": True, "noise_seed": 3, "cfg": 4.0, "sampler": ["select", 0], "sigmas": add_sigmas(prompt, "sigmas")}}
    save_latent(prompt, ["custom", 0], "custom1")
    return prompt


def reference_vs_custom_advanced() -> dict:
    """Batch 2 through the shipped custom-sampler workflow: AAA Reference Noise gives image i seed + i."""
    prompt = load_workflow("AAADiT custom sampler", "custom_advanced")
    prompt[node_id_of(prompt, "AAAEmptyLatentImage")]["inputs"]["batch_size"] = 2
    prompt[node_id_of(prompt, "AAAReferenceNoise")]["inputs"]["noise_seed"] = 3
    prompt[node_id_of(prompt, "CFGGuider")]["inputs"]["cfg"] = 4.0
    save_latent(prompt, [node_id_of(prompt, "SamplerCustomAdvanced"), 0], "advanced2")
    save_latent(prompt, add_aaa_sampler(prompt, "aaa", links(prompt)["model"]), "ref2")
    return prompt


def flux2_scheduler_vs_ours() -> dict:
    """256x256, 30 steps: ComfyUI's Flux2Scheduler and AAA FLUX.2 Sigmas in otherwise equal runs."""
    prompt = load_workflow("AAADiT custom sampler", "unused")
    del prompt[node_id_of(prompt, "SaveImage")], prompt[node_id_of(prompt, "AAAVAEDecode")]
    prompt[node_id_of(prompt, "AAAEmptyLatentImage")]["inputs"].update(width=256, height=256)
    prompt[node_id_of(prompt, "AAAFlux2Sigmas")]["inputs"].update(steps=30, width=256, height=256)
    advanced = node_id_of(prompt, "SamplerCustomAdvanced")
    save_latent(prompt, [advanced, 0], "ours30")
    prompt["flux2"] = {"class_type": "Flux2Scheduler", "inputs": {"steps": 30, "width": 256, "height": 256}}
    prompt["advanced_flux2"] = copy.deepcopy(prompt[advanced])
    prompt["advanced_flux2"]["inputs"]["sigmas"] = ["flux2", 0]
    save_latent(prompt, ["advanced_flux2", 0], "flux2_30")
    return prompt


def lora_prompt(lora_name: str, merged_name: str, tag: str, loader: str = "LoraLoaderModelOnly", strength: float = LORA_STRENGTH) -> dict:
    """KSampler and AAA Sampler on (base + LoRA via `loader`) and on the merged DiT file."""
    prompt = base_prompt()
    model = links(prompt)["model"]
    prompt["lora"] = {"class_type": loader, "inputs": {"model": model, "lora_name": lora_name, "strength_model": strength}}
    prompt["merged"] = {"class_type": "AAADiTLoader", "inputs": {"dit_name": merged_name, "weight_dtype": "fp32"}}
    save_latent(prompt, add_ksampler(prompt, "k_lora", ["lora", 0]), f"{tag}_k_lora")
    save_latent(prompt, add_ksampler(prompt, "k_merged", ["merged", 0]), f"{tag}_k_merged")
    save_latent(prompt, add_ksampler(prompt, "k_base", model), f"{tag}_k_base")
    save_latent(prompt, add_aaa_sampler(prompt, "a_lora", ["lora", 0]), f"{tag}_a_lora")
    save_latent(prompt, add_aaa_sampler(prompt, "a_merged", ["merged", 0]), f"{tag}_a_merged")
    return prompt


def native_patch_nodes() -> dict:
    """Conditioning nodes, KSamplerAdvanced and ModelMergeSimple on our MODEL and CONDITIONING (both trees)."""
    prompt = base_prompt()
    sockets = links(prompt)
    prompt["concat"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": sockets["positive"], "conditioning_from": sockets["positive"]}}
    prompt["late"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["concat", 0], "start": 0.5, "end": 1.0}}
    prompt["combine"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": sockets["positive"], "conditioning_2": ["late", 0]}}
    prompt["zero"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": sockets["negative"]}}
    prompt["advanced"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **sockets, "positive": ["combine", 0], "negative": ["zero", 0], "add_noise": "enable", "noise_seed": 3, "steps": STEPS,
        "cfg": 4.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    save_latent(prompt, ["advanced", 0], "conds")
    prompt["merged"] = {"class_type": "AAADiTLoader", "inputs": {"dit_name": "aaa_tiny_merged_kohya.safetensors", "weight_dtype": "fp32"}}
    prompt["merge"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": sockets["model"], "model2": ["merged", 0], "ratio": 0.0}}
    save_latent(prompt, add_ksampler(prompt, "k_merge", ["merge", 0]), "merge_all_model2")
    save_latent(prompt, add_ksampler(prompt, "k_merged", ["merged", 0]), "merged")
    save_latent(prompt, add_ksampler(prompt, "k_base", sockets["model"]), "base")
    return prompt


def shift_override() -> dict:
    """ModelSamplingSD3 (current ComfyUI) at our default shift is ComfyUI's flow sampling: the same result."""
    prompt = base_prompt()
    model = links(prompt)["model"]
    prompt["shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": DEFAULT_SHIFT}}
    save_latent(prompt, add_ksampler(prompt, "k_shift", ["shift", 0], scheduler="normal"), "shifted")
    save_latent(prompt, add_ksampler(prompt, "k_plain", model, scheduler="normal"), "plain")
    return prompt


def foreign_conditioning(sampler: str, shape: str, keys: str = ANIMA_KEYS) -> dict:
    """``sampler`` on our MODEL with a positive prompt from another text encoder (shape and keys as given)."""
    prompt = base_prompt()
    sockets = links(prompt)
    prompt["foreign"] = {"class_type": "AAATestForeignConditioning", "inputs": {"shape": shape, "keys": keys}}
    sampled = {"sampler_name": "euler", "scheduler": "simple", "cfg": 4.0, "steps": STEPS}
    if sampler == "KSampler":
        prompt["s"] = {"class_type": "KSampler", "inputs": {**sockets, **sampled, "seed": 3, "denoise": 1.0}}
    elif sampler == "KSamplerAdvanced":
        prompt["s"] = {"class_type": "KSamplerAdvanced", "inputs": {
            **sockets, **sampled, "add_noise": "enable", "noise_seed": 3, "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    elif sampler == "AAASampler":
        add_aaa_sampler(prompt, "s", sockets["model"])
    else:
        prompt["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        custom = {"sampler": ["select", 0], "sigmas": add_sigmas(prompt, "sigmas")}
        if sampler == "SamplerCustom":
            prompt["s"] = {"class_type": "SamplerCustom", "inputs": {**sockets, **custom, "add_noise": True, "noise_seed": 3, "cfg": 4.0}}
        else:
            prompt["noise"] = {"class_type": "AAAReferenceNoise", "inputs": {"noise_seed": 3}}
            prompt["guider"] = {"class_type": "CFGGuider", "inputs": {k: sockets[k] for k in ("model", "positive", "negative")} | {"cfg": 4.0}}
            prompt["s"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
                **custom, "noise": ["noise", 0], "guider": ["guider", 0], "latent_image": sockets["latent_image"]}}
    (prompt["guider"] if sampler == "SamplerCustomAdvanced" else prompt["s"])["inputs"]["positive"] = ["foreign", 0]
    save_latent(prompt, ["s", 0], f"foreign_{sampler}")
    return prompt


ANIMA = f"1,3,{TINY_DIT.text_dim}"  # a 3-word prompt, at the tiny DiT's width
FOREIGN = {
    # name: (prompt, what the one-line error says after "positive conditioning ")
    **{f"anima_{sampler}": (foreign_conditioning(sampler, ANIMA), "has 3 tokens but AAADiT prompts have 128")
       for sampler in ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "AAASampler")},
    "anima_keys": (foreign_conditioning("KSampler", f"1,128,{TINY_DIT.text_dim}"), "carries attention_mask, t5xxl_ids, t5xxl_weights"),
    "other_width": (foreign_conditioning("KSampler", "1,128,1024", ""), f"is 1024 wide but this AAADiT takes {TINY_DIT.text_dim}"),
    "rank_2": (foreign_conditioning("KSamplerAdvanced", f"1,{TINY_DIT.text_dim}", ""), f"holds (1, {TINY_DIT.text_dim}), not a (batch, tokens, width)"),
}
# What a native CLIP for our encoder will give: AAA Text Encode's shape with CLIP Text Encode's pooled_output.
OURS_WITH_POOLED = foreign_conditioning("KSampler", f"1,128,{TINY_DIT.text_dim}", "")


def sweep_prompt() -> dict:
    prompt = base_prompt()
    save_latent(prompt, add_ksampler(prompt, "k", links(prompt)["model"]), "sweep")
    return prompt


PROMPTS = {
    "ksampler_workflow": load_workflow("AAADiT native KSampler", "native"),
    "sampler_custom": reference_vs_sampler_custom(),
    "custom_advanced": reference_vs_custom_advanced(),
    "flux2_scheduler": flux2_scheduler_vs_ours(),
    "lora_kohya": lora_prompt("aaa_lora_kohya.safetensors", "aaa_tiny_merged_kohya.safetensors", "kohya"),
    "lora_peft": lora_prompt("aaa_lora_peft.safetensors", "aaa_tiny_merged_peft.safetensors", "peft"),
    "lora_peft_bare": lora_prompt("aaa_lora_peft_bare.safetensors", "aaa_tiny_merged_peft.safetensors", "peft_bare", "AAALoraLoader"),
    "lora_trained": lora_prompt("aaa_lora_trained.safetensors", "aaa_tiny_merged_trained.safetensors", "trained", strength=1.0),
    "native_patch_nodes": native_patch_nodes(),
    "shift_override": shift_override(),
    **{name: prompt for name, (prompt, _) in FOREIGN.items()},
    "ours_with_pooled": OURS_WITH_POOLED,
}
ACTIONS = [execute(prompt) for prompt in PROMPTS.values()] + [
    execute_each_choice(sweep_prompt(), "k", "sampler_name"),
    execute_each_choice(sweep_prompt(), "k", "scheduler"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("comfyui_native")
    models = base / "models"
    paths = save_tiny_models(models)
    loras = models / "loras"
    loras.mkdir()
    factors = lora_factors()
    save_kohya_lora(loras / "aaa_lora_kohya.safetensors", factors)
    save_merged_dit(paths["dit"], models / "unet" / "aaa_tiny_merged_kohya.safetensors", factors, LORA_ALPHA / LORA_RANK)
    save_peft_lora(loras / "aaa_lora_peft.safetensors", factors, "diffusion_model.")
    save_peft_lora(loras / "aaa_lora_peft_bare.safetensors", factors, "")
    save_merged_dit(paths["dit"], models / "unet" / "aaa_tiny_merged_peft.safetensors", factors, 1.0)  # no alpha: scale 1
    save_trained_lora(paths["dit"], loras / "aaa_lora_trained.safetensors", models / "unet" / "aaa_tiny_merged_trained.safetensors")
    return run_in_comfyui(
        ROOT, ACTIONS, base / "work", model_paths={name: models / name for name in ("unet", "clip", "vae", "loras")},
        test_nodes=[Path(__file__).parent / "comfyui_test_nodes.py"], timeout=900,
    )


def action(run: dict, name: str) -> dict:
    outcome = run["actions"][list(PROMPTS).index(name)] if name in PROMPTS else run["actions"][len(PROMPTS) + ["samplers", "schedulers"].index(name)]
    return outcome


def latents(run: dict, outcome: dict, prefix: str) -> torch.Tensor:
    (name,) = [f for f in outcome["files"] if f.startswith(f"latents/{prefix}_")]
    return load_file(str(Path(run["output_dir"]) / name))["latent_tensor"]


def missing_node(outcome: dict) -> bool:
    return outcome["status"] == "error" and (outcome["validation"]["error"] or {}).get("type") == "missing_node_type"


def test_native_ksampler_workflow_writes_an_image(run: dict) -> None:
    assert run["pack"]["imported"], run["pack"]["error"]
    outcome = action(run, "ksampler_workflow")
    assert outcome["status"] == "success", outcome["error"]
    (image,) = outcome["files"]
    from PIL import Image

    with Image.open(Path(run["output_dir"]) / image) as saved:
        assert saved.size == (WIDTH, HEIGHT)


def test_sampler_custom_with_our_sigmas_equals_aaa_sampler(run: dict) -> None:
    outcome = action(run, "sampler_custom")
    assert outcome["status"] == "success", outcome["error"]
    reference, custom = latents(run, outcome, "ref1"), latents(run, outcome, "custom1")
    assert reference.shape == (1, 128, HEIGHT // 16, WIDTH // 16) and reference.abs().max() > 0.1
    torch.testing.assert_close(custom, reference, rtol=1e-5, atol=1e-5)


def test_sampler_custom_advanced_with_reference_noise_equals_aaa_sampler_per_image(run: dict) -> None:
    outcome = action(run, "custom_advanced")
    if run["comfyui_version"] is None and missing_node(outcome):
        pytest.skip("the 2024 tree has no SamplerCustomAdvanced")
    assert outcome["status"] == "success", outcome["error"]
    reference, advanced = latents(run, outcome, "ref2"), latents(run, outcome, "advanced2")
    assert reference.shape[0] == 2 and not torch.allclose(reference[0], reference[1])  # seeds 3 and 4
    torch.testing.assert_close(advanced, reference, rtol=1e-5, atol=1e-5)


def test_flux2_scheduler_gives_our_sigmas_at_256_and_30_steps(run: dict) -> None:
    outcome = action(run, "flux2_scheduler")
    if run["comfyui_version"] is None and missing_node(outcome):
        pytest.skip("the 2024 tree has neither Flux2Scheduler nor SamplerCustomAdvanced")
    assert outcome["status"] == "success", outcome["error"]
    torch.testing.assert_close(latents(run, outcome, "flux2_30"), latents(run, outcome, "ours30"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["kohya", "peft", "peft_bare", "trained"])
def test_lora_loaders_patch_the_weights_by_hand_formula(run: dict, layout: str) -> None:
    """LoraLoaderModelOnly for kohya, prefixed PEFT and our trainer's files; AAA LoRA Loader for PEFT without a prefix.

    Our trainer's file is compared with the checkpoint ``python -m training.export`` merges from it."""
    outcome = action(run, f"lora_{layout}")
    assert outcome["status"] == "success", outcome["error"]
    base, lora = latents(run, outcome, f"{layout}_k_base"), latents(run, outcome, f"{layout}_k_lora")
    if layout == "peft" and run["comfyui_version"] is None:
        # The 2024 loader knows no lora_A/lora_B keys: it loads nothing (README: use the kohya layout there).
        torch.testing.assert_close(lora, base)
        return
    assert (lora - base).abs().max() > 1e-3  # the LoRA changes the result...
    # ... exactly as merging W + strength * scale * B @ A by hand does, in KSampler and in AAA Sampler.
    torch.testing.assert_close(lora, latents(run, outcome, f"{layout}_k_merged"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents(run, outcome, f"{layout}_a_lora"), latents(run, outcome, f"{layout}_a_merged"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sweep", ["samplers", "schedulers"])
def test_every_sampler_and_scheduler_comfyui_lists_runs_two_steps(run: dict, sweep: str) -> None:
    outcome = action(run, sweep)
    assert len(outcome["choices"]) >= 6
    failed = {choice: r["error"] for choice, r in zip(outcome["choices"], outcome["runs"]) if r["status"] != "success"}
    assert failed == {}
    for choice, r in zip(outcome["choices"], outcome["runs"]):
        (name,) = r["files"]
        samples = load_file(str(Path(run["output_dir"]) / name))["latent_tensor"]
        assert samples.shape == (1, 128, HEIGHT // 16, WIDTH // 16) and torch.isfinite(samples).all(), choice


def test_native_conditioning_and_model_patch_nodes_work(run: dict) -> None:
    outcome = action(run, "native_patch_nodes")
    assert outcome["status"] == "success", outcome["error"]
    assert torch.isfinite(latents(run, outcome, "conds")).all()
    merged, base = latents(run, outcome, "merged"), latents(run, outcome, "base")
    assert (merged - base).abs().max() > 1e-3
    torch.testing.assert_close(latents(run, outcome, "merge_all_model2"), merged, rtol=1e-5, atol=1e-5)


def test_model_sampling_sd3_at_our_shift_changes_nothing(run: dict) -> None:
    outcome = action(run, "shift_override")
    if run["comfyui_version"] is None and missing_node(outcome):
        pytest.skip("the 2024 tree has no ModelSamplingSD3")
    assert outcome["status"] == "success", outcome["error"]
    torch.testing.assert_close(latents(run, outcome, "shifted"), latents(run, outcome, "plain"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FOREIGN))
def test_conditioning_from_another_text_encoder_is_one_line_in_every_sampler(run: dict, name: str) -> None:
    outcome = action(run, name)
    if run["comfyui_version"] is None and missing_node(outcome):
        pytest.skip("the 2024 tree has no SamplerCustomAdvanced")
    assert outcome["status"] == "error" and outcome["files"] == []
    failure = dict(outcome["messages"])["execution_error"]
    message = failure["exception_message"].strip()  # current ComfyUI appends one newline
    assert "\n" not in message and failure["exception_type"].endswith("InputError")
    assert message.startswith(f"positive conditioning {FOREIGN[name][1]}")
    assert "encode the prompt with CLIP Text Encode on AAA CLIP Loader's CLIP" in message


def test_our_embedding_with_clip_text_encodes_pooled_output_samples(run: dict) -> None:
    outcome = action(run, "ours_with_pooled")
    assert outcome["status"] == "success", outcome["error"]
    assert torch.isfinite(latents(run, outcome, "foreign_KSampler")).all()
