"""The resident SAM 3 model: loaded once per worker, it segments batches of images with many prompts."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers import Sam3Model, Sam3Processor
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.detections import PromptDetections
from sam3_batch.worker.model_input import PreparedImage
from sam3_batch.worker.sam3_adapter import (
    UPSAMPLE_PIXEL_BUDGET,
    as_text_embeds,
    select_vision_rows,
    text_features,
    to_detections,
)
from sam3_batch.worker.tiny_model import resolve_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_CACHE_SIZE = 4096  # prompts; ~16 KB each for the full model in bf16

# Automatic batch size (settings.batch_size == 0). On the CPU a bigger batch buys nothing measurable.
CPU_BATCH_SIZE = 8
AUTO_BATCH_LIMIT = 64  # past this a GPU is saturated; bigger batches only add latency and host memory
AUTO_BATCH_PROMPTS = 4  # prompts per image the probe assumes; jobs with more rely on the OOM split
# Fraction of free GPU memory the batch may plan on: the rest absorbs allocator fragmentation.
AUTO_BATCH_MEMORY_SHARE = 0.85


@dataclass(frozen=True)
class ImagePreparer:
    """The processor's resize + normalize of one decoded image. Picklable: loader processes run it."""

    image_processor: Any
    dtype: torch.dtype  # the model's: casting here halves the bytes moved in bf16/fp16

    def __call__(self, image: PIL.Image.Image) -> PreparedImage:
        encoded = self.image_processor(images=image, return_tensors="pt")
        pixels: torch.Tensor = encoded["pixel_values"][0].to(self.dtype)
        return PreparedImage(pixel_values=pixels, original_size_hw=(image.height, image.width))


@dataclass(frozen=True)
class _TextEmbedding:
    features: torch.Tensor  # (1, tokens, hidden): the model's projected text features
    attention_mask: torch.Tensor  # (1, tokens)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def batch_size_for(free_bytes: int, fixed_bytes: int, per_image_bytes: int, limit: int = AUTO_BATCH_LIMIT) -> int:
    """The most images per batch whose memory (``fixed + n * per_image``) fits a share of ``free_bytes``."""
    budget = int(free_bytes * AUTO_BATCH_MEMORY_SHARE) - max(fixed_bytes, 0)
    if per_image_bytes <= 0:
        return limit
    return max(1, min(limit, budget // per_image_bytes))


class Sam3Runtime:
    """Batched SAM 3 inference: one vision pass per image for all its prompts, cached text embeddings."""

    def __init__(
        self,
        model: Sam3Model,
        processor: Sam3Processor,
        *,
        model_id: str,
        revision: str | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self.preparer = ImagePreparer(processor.image_processor, dtype)
        text_config: Any = model.config.text_config
        self._text_tokens = int(text_config.max_position_embeddings)
        self._text_cache: OrderedDict[str, _TextEmbedding] = OrderedDict()
        self._text_lock = threading.Lock()
        # One batch on the model at a time: chunks handled in parallel (threads pool) overlap their I/O,
        # never their activations, so the batch size planned for the free memory stays valid.
        self._model_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str,
        revision: str | None,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        *,
        cache_dir: Path | None = None,
    ) -> Sam3Runtime:
        """Load model + processor (``tiny-random`` builds the offline test checkpoint) onto the device."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = resolve_model(model, cache_dir)
        hub_revision = revision or "main"
        processor = Sam3Processor.from_pretrained(source, revision=hub_revision)
        network = Sam3Model.from_pretrained(
            source, revision=hub_revision, dtype=torch_dtype, attn_implementation="sdpa"
        )
        module: torch.nn.Module = network  # as a plain Module: transformers' to()/eval() are untyped
        module.to(torch_device).eval()
        if compile:
            # The ViT is most of the compute; the heads see a varying number of rows per batch.
            network.vision_encoder.compile()
        logger.info("loaded %s (revision %s) on %s as %s", model, revision, torch_device, torch_dtype)
        return cls(
            network, processor, model_id=model, revision=revision, device=torch_device, dtype=torch_dtype
        )

    def prepare(self, image: PIL.Image.Image) -> PreparedImage:
        """CPU preprocessing of one decoded RGB image (``self.preparer``, which loader processes run)."""
        return self.preparer(image)

    def segment(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds
    ) -> list[list[PromptDetections]]:
        """Segment each image with its own prompts; ``result[i][j]`` is image i, prompt j."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompt lists")
        if not images:
            return []
        with self._model_lock, torch.inference_mode():
            return self._segment_splitting_on_oom(images, prompts, thresholds)

    def suggest_batch_size(self, prompts_per_image: int = AUTO_BATCH_PROMPTS, limit: int = AUTO_BATCH_LIMIT) -> int:
        """Images per batch for this device: on CUDA, what fits the free memory, probed with 1 and 2 images.

        The probe runs the real ``segment`` (all queries kept, so post-processing peaks too) on black
        images at the model's input size; the difference between the two peaks is the cost of one image.
        """
        if self.device.type != "cuda":
            return min(CPU_BATCH_SIZE, limit)
        try:
            one = self._probe_peak_bytes(1, prompts_per_image)
            two = self._probe_peak_bytes(2, prompts_per_image)
        except torch.OutOfMemoryError:
            self._release_cached_memory()
            logger.warning("automatic batch size: 2 images do not fit in GPU memory; using 1")
            return 1
        per_image = max(two - one, 1)
        # Full-size masks of a large photo are upsampled in groups bounded by this budget (float + bool).
        fixed = one - per_image + UPSAMPLE_PIXEL_BUDGET * 5
        free_bytes, _total = torch.cuda.mem_get_info(self.device)
        chosen = batch_size_for(free_bytes, fixed, per_image, limit)
        logger.info(
            "automatic batch size %d: %.0f MiB free, %.0f MiB per image, %.0f MiB fixed (%d prompts per image)",
            chosen, free_bytes / 2**20, per_image / 2**20, fixed / 2**20, prompts_per_image,
        )
        return chosen

    def _probe_peak_bytes(self, images: int, prompts_per_image: int) -> int:
        """Peak GPU memory above the resident weights while segmenting ``images`` blank images."""
        side = self._input_side()
        blank = self.prepare(PIL.Image.new("RGB", (side, side)))
        prompts = [f"probe {index}" for index in range(prompts_per_image)]
        torch.cuda.synchronize(self.device)
        self._release_cached_memory()
        baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        # Not segment(): its OOM split would hide the very limit being measured.
        with self._model_lock, torch.inference_mode():
            self._segment_batch([blank] * images, [prompts] * images, Thresholds(score=0.0, mask=0.5))
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        self._release_cached_memory()
        return peak

    def _input_side(self) -> int:
        size: Any = self.processor.image_processor.size
        return int(size["height"])

    def _segment_splitting_on_oom(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds
    ) -> list[list[PromptDetections]]:
        try:
            return self._segment_batch(images, prompts, thresholds)
        except torch.OutOfMemoryError:
            if len(images) == 1:
                raise
        # Retried outside the except block so the failed attempt's tensors (held by the traceback) are freed.
        self._release_cached_memory()
        half = len(images) // 2
        logger.warning(
            "out of GPU memory on %d images; retrying as %d + %d", len(images), half, len(images) - half
        )
        first = self._segment_splitting_on_oom(images[:half], prompts[:half], thresholds)
        return first + self._segment_splitting_on_oom(images[half:], prompts[half:], thresholds)

    def _segment_batch(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds
    ) -> list[list[PromptDetections]]:
        row_prompts = [prompt for image_prompts in prompts for prompt in image_prompts]
        if not row_prompts:
            return [[] for _ in images]
        outputs = self._forward_batch(self._stack(images), prompts)
        row_sizes = [
            image.original_size_hw for image, plist in zip(images, prompts, strict=True) for _ in plist
        ]
        flat = to_detections(outputs, row_prompts, row_sizes, thresholds)
        grouped: list[list[PromptDetections]] = []
        for image_prompts in prompts:
            grouped.append(flat[: len(image_prompts)])
            flat = flat[len(image_prompts) :]
        return grouped

    def _forward_batch(
        self, pixel_values: torch.Tensor, prompts: list[list[str]]
    ) -> Sam3ImageSegmentationOutput:
        """One vision pass for the batch, then one detector pass over every (image, prompt) row."""
        vision = self.model.get_vision_features(pixel_values=pixel_values)
        # Row k of the detector batch is (image rows[k], its next prompt); built on the host, no device sync.
        image_of_row = [index for index, image_prompts in enumerate(prompts) for _ in image_prompts]
        rows = torch.tensor(image_of_row, dtype=torch.long).to(self.device, non_blocking=True)
        features, attention_mask = self._text_rows([p for image_prompts in prompts for p in image_prompts])
        outputs: Sam3ImageSegmentationOutput = self.model(
            vision_embeds=select_vision_rows(vision, rows),
            text_embeds=as_text_embeds(features),
            attention_mask=attention_mask,
        )
        return outputs

    def _stack(self, images: list[PreparedImage]) -> torch.Tensor:
        pixels = [image.pixel_values.to(self.dtype) for image in images]
        if self.device.type == "cuda":
            # Stacked into page-locked memory (torch's host allocator caches it), then one asynchronous
            # copy to the GPU: the pixels arrive from loader processes in shared memory, not pinned.
            staged = torch.empty((len(pixels), *pixels[0].shape), dtype=self.dtype, pin_memory=True)
            torch.stack(pixels, out=staged)
            return staged.to(self.device, non_blocking=True)
        return torch.stack(pixels).to(self.device)

    def _text_rows(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features and attention masks for each prompt (cached when seen before), stacked as rows."""
        embeddings = self._text_embeddings(prompts)
        features = torch.cat([embeddings[prompt].features for prompt in prompts])
        mask = torch.cat([embeddings[prompt].attention_mask for prompt in prompts])
        return features, mask

    def _text_embeddings(self, prompts: list[str]) -> dict[str, _TextEmbedding]:
        with self._text_lock:
            found = {p: self._text_cache[p] for p in dict.fromkeys(prompts) if p in self._text_cache}
            for prompt in found:
                self._text_cache.move_to_end(prompt)
            missing = [p for p in dict.fromkeys(prompts) if p not in found]
            if missing:
                found.update(self._encode_texts(missing))
                self._remember(found, missing)
        return found

    def _encode_texts(self, prompts: list[str]) -> dict[str, _TextEmbedding]:
        tokens = self.processor.tokenizer(
            prompts,
            padding="max_length",
            max_length=self._text_tokens,
            truncation=True,  # the processor does not truncate; past 32 tokens the model would fail
            return_tensors="pt",
        ).to(self.device)
        features = text_features(self.model.get_text_features(**tokens))
        return {
            prompt: _TextEmbedding(features[i : i + 1], tokens["attention_mask"][i : i + 1])
            for i, prompt in enumerate(prompts)
        }

    def _remember(self, embeddings: dict[str, _TextEmbedding], prompts: list[str]) -> None:
        for prompt in prompts:
            self._text_cache[prompt] = embeddings[prompt]
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)

    def _release_cached_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

