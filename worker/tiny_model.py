"""Tiny random-weight SAM 3 checkpoints, built offline, that load exactly like ``facebook/sam3``."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTokenizer,
    Sam3Config,
    Sam3Model,
    Sam3Processor,
    Sam3TrackerConfig,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
)
from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "sam3-batch"
# Bump when the built checkpoint changes, so stale cached builds are not reused.
_LAYOUT_VERSION = 2  # 2: with the tracker (object prompts) in TRACKER_SUBDIR
# The tracker (points/box -> one mask per object) lives beside the detector in this subfolder; facebook/sam3
# holds both in one checkpoint (the tracker's ViT is the detector's: transformers renames
# ``detector_model.vision_encoder.backbone.`` to the tracker's ``vision_encoder.backbone.`` on load).
TRACKER_SUBDIR = "tracker"
_TRACKER_MODEL_TYPES = ("sam3_video", "sam3_tracker", "sam3_tracker_video")

PATCH_SIZE = 14
TEXT_MAX_TOKENS = 32  # Sam3Processor pads every prompt to 32 tokens
# Larger than the usual 0.02 so random weights give spread-out scores and crisp masks (logits ~40),
# which makes score thresholds meaningful and mask comparisons robust in tests.
_INIT_RANGE = 0.2
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# Whole-word merges keep common prompts short; any other text falls back to byte-level characters.
_COMMON_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "person", "people", "man", "woman", "child",
    "car", "truck", "bus", "bicycle", "dog", "cat", "bird", "horse", "tree", "building", "house",
    "road", "sky", "water", "boat", "chair", "table", "bottle", "cup", "phone", "book", "ball",
    "sign", "window", "door", "plant", "flower", "shirt", "red", "blue", "green", "white", "black",
)  # fmt: skip


def resolve_tracker(model: str, cache_dir: Path | None = None, seed: int = 0) -> Path | str | None:
    """Where the tracker (object prompts) loads from, or None when the checkpoint has none.

    A hub id is the combined checkpoint (``facebook/sam3`` holds detector and tracker); a local folder holds
    the tracker in ``TRACKER_SUBDIR`` (as ``tiny-random`` does) or is itself a combined or tracker checkpoint.
    """
    source = resolve_model(model, cache_dir, seed)
    folder = Path(source)
    if not folder.is_dir():
        return source
    if (folder / TRACKER_SUBDIR / "config.json").is_file():
        return folder / TRACKER_SUBDIR
    config = folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return folder if model_type in _TRACKER_MODEL_TYPES else None


def resolve_model(model: str, cache_dir: Path | None = None, seed: int = 0) -> Path | str:
    """The tiny checkpoint's path (built once, cached) for ``tiny-random``; any other id/path unchanged."""
    if model != TINY_RANDOM:
        return model
    target = (cache_dir or DEFAULT_CACHE_DIR) / f"{TINY_RANDOM}-v{_LAYOUT_VERSION}-{seed}"
    if not (target / "config.json").is_file():
        _build_atomically(target, seed)
    return target


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Build the tiny test checkpoint (hidden 32, 224 px, 5 queries) into ``path``."""
    return build_checkpoint(path, seed=seed)


def build_checkpoint(
    path: Path,
    *,
    hidden: int = 32,
    layers: int = 1,
    image_size: int = 224,
    num_queries: int = 5,
    scale_factors: tuple[float, ...] = (2.0, 1.0),
    seed: int = 0,
) -> Path:
    """Build a random-weight SAM 3 checkpoint of the given size; deterministic for a seed.

    ``layers`` is the depth of the text, DETR and windowed-ViT stacks; the ViT adds one global layer.
    ``scale_factors`` are the FPN levels: the default is the cheapest; ``(4.0, 2.0, 1.0, 0.5)`` is the
    full model's pyramid (DETR at the patch grid, masks at 4x it), the shape to benchmark with.
    """
    shape = _Shape(hidden, layers, image_size, num_queries, scale_factors)
    tokenizer = build_tokenizer()
    config = _sam3_config(shape, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = Sam3Model(config)
    image_processor = _image_processor(image_size, max(scale_factors))
    processor = Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _build_tracker(path / TRACKER_SUBDIR, model, shape, image_processor, seed)
    return path


def _build_tracker(
    path: Path, detector: Sam3Model, shape: _Shape, image_processor: Sam3ImageProcessor, seed: int
) -> None:
    """The tracker for object prompts, its ViT the detector's (as in ``facebook/sam3``), its heads random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tracker = Sam3TrackerModel(_tracker_config(shape, detector.config))
    tracker.vision_encoder.backbone.load_state_dict(detector.vision_encoder.backbone.state_dict())
    path.mkdir(parents=True, exist_ok=True)
    tracker.save_pretrained(path)
    Sam3TrackerProcessor(image_processor=image_processor).save_pretrained(path)


def _tracker_config(shape: _Shape, detector_config: Sam3Config) -> Sam3TrackerConfig:
    patches = shape.image_size // PATCH_SIZE
    vision_config: Any = detector_config.vision_config
    vision = vision_config.to_dict()
    # The tracker's own FPN neck: three levels (4x, 2x, 1x the patch grid), as its mask decoder needs.
    vision["scale_factors"] = [4.0, 2.0, 1.0]
    vision["backbone_feature_sizes"] = [[4 * patches] * 2, [2 * patches] * 2, [patches] * 2]
    hidden = shape.hidden
    return Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": hidden, "image_size": shape.image_size, "patch_size": PATCH_SIZE},
        mask_decoder_config={
            "hidden_size": hidden, "mlp_dim": 2 * hidden, "num_hidden_layers": 2,
            "num_attention_heads": hidden // 16, "iou_head_hidden_dim": hidden,
        },
        initializer_range=_INIT_RANGE,
    )


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a ~600-token vocab that encodes any text (byte-level fallback)."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {_BOS: 0, _EOS: 1}
    for token in [*alphabet, *(f"{char}</w>" for char in alphabet)]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _COMMON_WORDS:
        _add_word_merges(word, vocab, merges)
    # The tokenizers backend wants (left, right) pairs, whatever the annotation says.
    return CLIPTokenizer(vocab=vocab, merges=cast("list[str]", merges), model_max_length=TEXT_MAX_TOKENS)


def _add_word_merges(word: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    pieces = [*word[:-1], f"{word[-1]}</w>"]
    merged = pieces[0]
    for piece in pieces[1:]:
        pair = (merged, piece)
        merged += piece
        if merged not in vocab:
            vocab[merged] = len(vocab)
            merges.append(pair)


@dataclass(frozen=True)
class _Shape:
    hidden: int
    layers: int
    image_size: int
    num_queries: int
    scale_factors: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.hidden % 16 or self.hidden <= 0:
            raise ValueError(f"hidden must be a positive multiple of 16 (heads of 16 dims), got {self.hidden}")
        if self.image_size % PATCH_SIZE or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {self.image_size}")
        if len(self.scale_factors) < 2 or not set(self.scale_factors) <= {4.0, 2.0, 1.0, 0.5}:
            raise ValueError(f"scale_factors must be 2+ of 4.0, 2.0, 1.0, 0.5, got {self.scale_factors}")
        if self.layers < 1 or self.num_queries < 1:
            raise ValueError(f"layers and num_queries must be >= 1, got {self.layers} and {self.num_queries}")


def _sam3_config(shape: _Shape, vocab_size: int) -> Sam3Config:
    hidden, layers, image_size = shape.hidden, shape.layers, shape.image_size
    patches = image_size // PATCH_SIZE
    heads = hidden // 16
    blocks = {"hidden_size": hidden, "num_attention_heads": heads, "initializer_range": _INIT_RANGE}
    feed_forward = {**blocks, "intermediate_size": 2 * hidden}
    backbone = {
        **feed_forward,
        "model_type": "sam3_vit_model",
        "num_hidden_layers": layers + 1,
        "image_size": image_size,
        "pretrain_image_size": image_size,
        "patch_size": PATCH_SIZE,
        # Windowed layers with a global one last, as in the full model (which has 4 global of 32).
        "window_size": patches // 2 if patches % 2 == 0 else patches,
        "global_attn_indexes": [layers],
    }
    return Sam3Config(
        vision_config={
            "backbone_config": backbone,
            "fpn_hidden_size": hidden,
            "scale_factors": list(shape.scale_factors),
            "backbone_feature_sizes": [[int(f * patches)] * 2 for f in shape.scale_factors],
            "initializer_range": _INIT_RANGE,
        },
        text_config={
            **feed_forward,
            "vocab_size": vocab_size,
            "projection_dim": hidden,
            "num_hidden_layers": layers,
            "max_position_embeddings": TEXT_MAX_TOKENS,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        geometry_encoder_config={**feed_forward, "num_layers": 1},
        detr_encoder_config={**feed_forward, "num_layers": layers},
        detr_decoder_config={**feed_forward, "num_layers": layers, "num_queries": shape.num_queries},
        # The pixel decoder upsamples between the FPN levels it is given (all but the coarsest).
        mask_decoder_config={**blocks, "num_upsampling_stages": max(2, len(shape.scale_factors) - 1)},
        initializer_range=_INIT_RANGE,
    )


def _image_processor(image_size: int, finest_scale: float) -> Sam3ImageProcessor:
    mask_side = int(finest_scale * (image_size // PATCH_SIZE))  # masks come out at the finest FPN level
    return Sam3ImageProcessor(
        size={"height": image_size, "width": image_size},
        mask_size={"height": mask_side, "width": mask_side},
    )


def _build_atomically(target: Path, seed: int) -> None:
    # Build beside the target and rename, so concurrent workers never load a half-written checkpoint.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_checkpoint(staging, seed=seed)
        staging.rename(target)
        logger.info("built tiny random SAM 3 checkpoint at %s", target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # Another process finished first; its build is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
