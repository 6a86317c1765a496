"""The encoder presets as plain data: readable without importing torch (the workflow plans with it).

Each :class:`Preset` row says how to build one encoder with timm (architecture + kwargs), what it expects
(native input size, normalisation), which tokens form the embedding (``pool``), the embedding width, the
default autocast precision on CUDA, and where its weights live on the Hugging Face hub. Building happens
in :mod:`pipeline.features.presets`; fetching and pinning weights in :mod:`pipeline.features.weights`.
See ``docs/encoders.md`` for the table, sources and what is uncertain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (CONCH v1); kept for reference
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preset:
    """One encoder, as the model card describes it."""

    name: str
    arch: str  # timm architecture the kwargs apply to
    kwargs: dict[str, Any]  # timm kwargs; "mlp_layer": "swiglu_packed" and "act_layer": "silu" are names
    input_size: int  # native patch size in pixels (the model card's)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pool: str  # "cls" | "cls+mean" (CLS ++ mean of patch tokens, registers excluded) | "attn_pool"
    embed_dim: int
    precision: str  # autocast dtype on CUDA: bf16 | fp16 | fp32
    hf_repo: str | None
    hf_files: tuple[str, ...] = ()  # first existing file in the repo wins
    convert: str | None = None  # key conversion applied to a checkpoint before loading
    head: dict[str, Any] | None = None  # attn_pool head (CONCH): {"dim", "heads", "queries"}
    licence: str = ""
    gated: bool = False
    builtin: bool = False  # registered elsewhere (encoders.py); listed here for docs and prefetch
    notes: str = ""


_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        name="resnet50_trunc", arch="resnet50.tv_in1k", kwargs={}, input_size=224,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, pool="layer3+avg", embed_dim=1024, precision="bf16",
        hf_repo=None, licence="BSD-3-Clause (torchvision weights via timm)", builtin=True,
        notes="ImageNet ResNet-50 truncated after layer 3 and average-pooled (the CLAM baseline).",
    ),
    Preset(
        name="uni", arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pool="cls", embed_dim=1024, precision="bf16",
        hf_repo="MahmoodLab/UNI", hf_files=("pytorch_model.bin",),
        licence="CC-BY-NC-ND-4.0; gated (manual approval, institutional e-mail)", gated=True,
        notes="ViT-L/16, DINOv2-trained; embedding = CLS token after the final norm.",
    ),
    Preset(
        name="uni2_h", arch="vit_giant_patch14_224",
        kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                "dynamic_img_size": True, **_SWIGLU},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pool="cls", embed_dim=1536, precision="bf16",
        hf_repo="MahmoodLab/UNI2-h", hf_files=("pytorch_model.bin",),
        licence="CC-BY-NC-ND-4.0; gated (manual approval, institutional e-mail)", gated=True,
        notes="ViT-H/14-style (depth 24, width 1536, 24 heads), SwiGLU, 8 register tokens; CLS token.",
    ),
    Preset(
        name="conch_v1_5", arch="vit_large_patch16_224",
        kwargs={"img_size": 448, "patch_size": 16, "init_values": 1e-5},
        input_size=448, mean=IMAGENET_MEAN, std=IMAGENET_STD, pool="attn_pool", embed_dim=768,
        precision="bf16", hf_repo="MahmoodLab/conchv1_5", hf_files=("pytorch_model_vision.bin",),
        convert="conch_v1_5", head={"dim": 768, "heads": 8, "queries": 1},
        licence="CC-BY-NC-ND-4.0; gated (manual approval, institutional e-mail)", gated=True,
        notes="Vision tower of CONCH v1.5: ViT-L/16 trunk at 448 px -> contrastive attentional pooler "
              "(1 learned query, 8 heads, 1024 -> 768) over all trunk tokens -> LayerNorm. The 768-d output "
              "is taken before the image-text projection (the patch feature TITAN consumes).",
    ),
    Preset(
        name="virchow2", arch="vit_huge_patch14_224",
        kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pool="cls+mean", embed_dim=2560,
        precision="fp16", hf_repo="paige-ai/Virchow2", hf_files=("pytorch_model.bin", "model.safetensors"),
        licence="CC-BY-NC-ND-4.0; gated", gated=True,
        notes="ViT-H/14 (1280), SwiGLU, 4 register tokens; embedding = concat(CLS, mean of the 256 patch "
              "tokens, registers excluded) = 2560, as on the model card.",
    ),
    Preset(
        name="h_optimus_0", arch="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        input_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, pool="cls", embed_dim=1536, precision="fp16",
        hf_repo="bioptimus/H-optimus-0", hf_files=("pytorch_model.bin", "model.safetensors"),
        licence="Apache-2.0; gated (automatic approval)", gated=True,
        notes="ViT-g/14, 4 registers, SwiGLU (DINOv2 giant); CLS token.",
    ),
    Preset(
        name="h_optimus_1", arch="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        input_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, pool="cls", embed_dim=1536, precision="fp16",
        hf_repo="bioptimus/H-optimus-1", hf_files=("pytorch_model.bin", "model.safetensors"),
        licence="non-commercial / academic research licence; gated (manual approval)", gated=True,
        notes="Same architecture as H-optimus-0, trained on >1M slides; CLS token.",
    ),
    Preset(
        name="phikon_v2", arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pool="cls", embed_dim=1024, precision="bf16",
        hf_repo="owkin/phikon-v2", hf_files=("model.safetensors",), convert="hf_dinov2",
        licence="Owkin non-commercial licence; not gated", gated=False,
        notes="ViT-L/16 DINOv2 published in transformers format (Dinov2Model); rebuilt as a timm ViT and the "
              "keys converted at load. Embedding = last_hidden_state[:, 0] (CLS after the final LayerNorm).",
    ),
    Preset(
        name="prov_gigapath", arch="vit_giant_patch14_dinov2",
        kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pool="cls", embed_dim=1536, precision="fp16",
        hf_repo="prov-gigapath/prov-gigapath", hf_files=("pytorch_model.bin",),
        licence="prov-gigapath model licence (research use); gated (accept conditions)", gated=True,
        notes="Tile encoder: DINOv2 ViT-g with patch 16 (SwiGLU, no registers); CLS token.",
    ),
    Preset(
        name="h0_mini", arch="vit_base_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, **_SWIGLU},
        input_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, pool="cls+mean", embed_dim=1536,
        precision="fp16", hf_repo="bioptimus/H0-mini", hf_files=("pytorch_model.bin", "model.safetensors"),
        licence="CC-BY-NC-ND-4.0; gated (manual approval)", gated=True,
        notes="ViT-B/14 distilled from H-optimus-0, 4 registers, SwiGLU; embedding = concat(CLS, mean of "
              "patch tokens) = 1536, the combined feature of the model card (CLS alone would be 768).",
    ),
]}
