"""ComfyUI nodes for AAADiT: loaders, prompt encoding, sampling and the FLUX.2 VAE.

Every node id and display name is defined here, once. The modules are glue: ``comfy_bridge``,
``native_model`` (the DiT as a native MODEL) and ``native_clip`` (the text encoder as a native
CLIP) are the only ones that touch ComfyUI, ``native_dit`` adapts AAADiT to ComfyUI's calling
conventions in plain torch, ``model_files`` resolves and downloads model files, and the node
modules read their widgets and call ``aaa_core``.
"""

from .conditioning import AAATextEncode
from .latent import AAAEmptyLatentImage, AAAVAEDecode, AAAVAEEncode
from .loaders import AAADiTLoader, AAATextEncoderLoader, AAAVAELoader
from .lora import AAALoraLoader
from .native_clip import AAACLIPLoader
from .native_sampling import AAAFlux2Sigmas, AAAReferenceNoise
from .sampling import AAASampler

# node id -> (class, display name)
NODES = {
    "AAADiTLoader": (AAADiTLoader, "AAA DiT Loader"),
    "AAATextEncoderLoader": (AAATextEncoderLoader, "AAA Text Encoder Loader"),
    "AAACLIPLoader": (AAACLIPLoader, "AAA CLIP Loader"),
    "AAAVAELoader": (AAAVAELoader, "AAA VAE Loader"),
    "AAALoraLoader": (AAALoraLoader, "AAA LoRA Loader"),
    "AAATextEncode": (AAATextEncode, "AAA Text Encode"),
    "AAAEmptyLatentImage": (AAAEmptyLatentImage, "AAA Empty Latent Image"),
    "AAASampler": (AAASampler, "AAA Sampler"),
    "AAAReferenceNoise": (AAAReferenceNoise, "AAA Reference Noise"),
    "AAAFlux2Sigmas": (AAAFlux2Sigmas, "AAA FLUX.2 Sigmas"),
    "AAAVAEDecode": (AAAVAEDecode, "AAA VAE Decode"),
    "AAAVAEEncode": (AAAVAEEncode, "AAA VAE Encode"),
}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}
