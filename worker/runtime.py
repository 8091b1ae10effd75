"""The resident SAM 3 model: loaded once per worker, it segments batches of images with many prompts."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.v2.functional as tv_functional
from transformers import Sam3Model, Sam3Processor
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

from sam3_batch.contracts.schemas import Thresholds
from sam3_batch.worker.compile_toolchain import require_compile_toolchain
from sam3_batch.worker.detections import MaskDelivery, PromptDetections
from sam3_batch.worker.device_post import UPSAMPLE_PIXEL_BUDGET, PendingDetections, defers_on
from sam3_batch.worker.model_input import DeviceNormalizer, PixelHandOff, PreparedImage, stacked_on
from sam3_batch.worker.precision import Precision, keep_heads_in_float32, resolve_precision
from sam3_batch.worker.sam3_adapter import (
    as_text_embeds,
    select_vision_rows,
    start_detections,
    text_features,
)
from sam3_batch.worker.tiny_model import resolve_model, resolve_tracker
from sam3_batch.worker.visual_prompts import VisualRequest, VisualResult
from sam3_batch.worker.visual_runtime import VisualSegmenter

logger = logging.getLogger(__name__)

_Asked = TypeVar("_Asked")  # what one image is asked (its prompts, or its visual request)
_Found = TypeVar("_Found")  # what one image gives back

TEXT_CACHE_SIZE = 4096  # prompts; ~16 KB each for the full model in bf16

# Automatic batch size (settings.batch_size == 0). On the CPU a bigger batch buys nothing measurable.
CPU_BATCH_SIZE = 8
AUTO_BATCH_LIMIT = 64  # past this a GPU is saturated; bigger batches only add latency and host memory
AUTO_BATCH_PROMPTS = 4  # prompts per image the probe assumes; jobs with more rely on the OOM split
# Fraction of free GPU memory the batch may plan on: the rest absorbs allocator fragmentation.
AUTO_BATCH_MEMORY_SHARE = 0.85

# A batch whose device work is done and whose results are on their way to the host.
_Finish = Callable[[], list[list[PromptDetections]]]


_BILINEAR = tv_functional.InterpolationMode.BILINEAR


def resized_uint8(pixels: torch.Tensor, size_hw: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's resize of uint8 (3, H, W) CPU pixels (bilinear, antialiased: the processor's), optionally
    written straight into ``out`` (3, *size_hw) uint8: the same pixels, bit for bit, without a copy."""
    if out is None:
        resized: torch.Tensor = tv_functional.resize(pixels, list(size_hw), interpolation=_BILINEAR, antialias=True)
        return resized
    same_layout = pixels.permute(1, 2, 0).is_contiguous() == out.permute(1, 2, 0).is_contiguous()
    if tuple(pixels.shape[-2:]) == size_hw or not same_layout:  # (torchvision returns same-size pixels as they are)
        return out.copy_(resized_uint8(pixels, size_hw))
    # The kernel torchvision's resize runs for uint8 on the CPU (through interpolate), given its output, which
    # it writes in the input's memory layout: ``out`` has that layout, so it is written in place.
    torch.ops.aten._upsample_bilinear2d_aa.out(pixels.unsqueeze(0), list(size_hw), False, None, None,
                                               out=out.unsqueeze(0))
    return out


@dataclass(frozen=True)
class ImagePreparer:
    """The processor's resize + normalize of one decoded image. Picklable: loader processes run it.

    ``hand_off`` says how much of it runs here and how much on the device (``model_input.PixelHandOff``).
    """

    image_processor: Any
    dtype: torch.dtype  # the model's: casting here halves the bytes moved in bf16/fp16
    hand_off: PixelHandOff = "uint8"

    @property
    def input_size_wh(self) -> tuple[int, int]:
        """The model's input size: a JPEG needs decoding at no more than this (``decode_for_model``)."""
        size: Any = self.image_processor.size
        return int(size["width"]), int(size["height"])

    @property
    def takes_tensors(self) -> bool:
        """Whether it takes the image as a uint8 (3, H, W) tensor too (``decode_for_model(..., as_tensor=True)``)."""
        return self.hand_off == "uint8"

    @property
    def fills_slots(self) -> bool:
        """Whether ``__call__`` can resize straight into a given uint8 (3, H, W) tensor (``out``): a pixel slot."""
        return self.hand_off == "uint8"

    def __call__(self, image: PIL.Image.Image | torch.Tensor, out: torch.Tensor | None = None) -> PreparedImage:
        """``out``: with the uint8 hand-off, a uint8 (3, H, W) tensor at the input size (best laid out
        H x W x 3 in memory, as a pixel slot is) that the resize writes into and the result is."""
        if isinstance(image, torch.Tensor):  # uint8 (3, H, W), best laid out H x W x 3 in memory
            size_hw = (int(image.shape[1]), int(image.shape[2]))
        else:
            size_hw = (image.height, image.width)
        if self.hand_off == "uint8":
            # The processor's own resize (torchvision, bilinear, antialiased, on uint8), without the processor's
            # per-call overhead; normalising is left to the device: the same pixels for a quarter of the host
            # CPU and bytes (bench/RESULTS.md, "Host budget").
            side_w, side_h = self.input_size_wh
            pixels = image if isinstance(image, torch.Tensor) else (
                torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
            return PreparedImage(resized_uint8(pixels, (side_h, side_w), out), size_hw)
        if out is not None:
            raise ValueError("only the uint8 hand-off resizes into a given tensor")
        if isinstance(image, torch.Tensor):  # the processor is given what it is given everywhere else
            image = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
        encoded = self.image_processor(images=image, return_tensors="pt")
        return PreparedImage(encoded["pixel_values"][0].to(self.dtype), size_hw)

    def device_normalizer(self) -> DeviceNormalizer:
        """What finishes 8-bit pixels on the device exactly as this processor would have on the host."""
        size: Any = self.image_processor.size
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        return DeviceNormalizer((int(size["height"]), int(size["width"])), tuple(mean), tuple(std),
                                float(self.image_processor.rescale_factor))


@dataclass(frozen=True)
class _TextEmbedding:
    features: torch.Tensor  # (1, tokens, hidden): the model's projected text features
    attention_mask: torch.Tensor  # (1, tokens)


@dataclass(frozen=True)
class _Rows:
    """A batch's (image, prompt) rows in order: each row's image index, prompt and image size."""

    images: list[int]
    prompts: list[str]
    sizes_hw: list[tuple[int, int]]

    @classmethod
    def of(cls, images: list[PreparedImage], prompts: list[list[str]]) -> _Rows:
        pairs = [(i, p) for i, image_prompts in enumerate(prompts) for p in image_prompts]
        return cls([i for i, _ in pairs], [p for _, p in pairs], [images[i].original_size_hw for i, _ in pairs])

    def part(self, start: int, limit: int | None) -> _Rows:
        end = len(self.prompts) if limit is None else start + limit
        return _Rows(self.images[start:end], self.prompts[start:end], self.sizes_hw[start:end])


def resolved_commit(model: str, revision: str) -> str | None:
    """The hub commit ``revision`` of ``model`` resolved to in the local cache (None for a local folder)."""
    if Path(model).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except ValueError:  # not a hub id (e.g. a path that does not exist)
        return None
    parts = Path(found).parts if isinstance(found, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for a ``dtype`` setting (``auto``: bfloat16 on GPU, float32 on CPU)."""
    return resolve_precision(dtype, device).weights


def compile_warmup_sizes(batch_size: int) -> list[int]:
    """Batch sizes that leave torch.compile nothing to recompile for any batch of 1..``batch_size`` images.

    Dynamo specialises size 1, compiles the next size it sees statically, and marks the batch dimension
    dynamic at the third: after 1, 2 and the largest size, every size in between reuses a compiled graph.
    """
    return sorted({1, min(2, batch_size), batch_size})


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
        precision: Precision | None = None,
        tracker_source: str | Path | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.revision = revision
        # The commit the hub resolved the revision to (None for a local folder): outputs name the weights.
        self.commit: str | None = resolved_commit(model_id, revision or "main")
        self.device = device
        self.precision = precision or Precision(str(dtype).removeprefix("torch."), dtype)
        self.dtype = self.precision.weights
        self.preparer = ImagePreparer(processor.image_processor, dtype)
        self._normalizer = self.preparer.device_normalizer()
        text_config: Any = model.config.text_config
        self._text_tokens = int(text_config.max_position_embeddings)
        self._text_cache: OrderedDict[str, _TextEmbedding] = OrderedDict()
        self._text_lock = threading.Lock()
        # One batch on the model at a time: chunks handled in parallel (threads pool) overlap their I/O,
        # never their activations, so the batch size planned for the free memory stays valid.
        self._model_lock = threading.Lock()
        # Most (image, prompt) rows one detector pass may take: None until an out-of-memory error sets it.
        self.row_limit: int | None = None
        # The visual path asks for its vision pass through _vision_features too: one place that can run
        # out of memory on the vision encoder, whichever kind of prompt the batch carries.
        self.visual = VisualSegmenter(
            model, self._text_rows, tracker_source, revision=revision, device=device, dtype=dtype,
            vision_features=self._vision_features,
        )

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
        precision = resolve_precision(dtype, torch_device)
        torch_dtype = precision.weights
        if compile:
            require_compile_toolchain(torch_device.type)
        source = resolve_model(model, cache_dir)
        hub_revision = revision or "main"
        processor = Sam3Processor.from_pretrained(source, revision=hub_revision)
        network = Sam3Model.from_pretrained(
            source, revision=hub_revision, dtype=torch_dtype, attn_implementation="sdpa"
        )
        module: torch.nn.Module = network  # as a plain Module: transformers' to()/eval() are untyped
        module.to(torch_device).eval()
        keep_heads_in_float32(network)  # inert unless the precision is an autocast one
        if compile:
            # The ViT is most of the compute; the heads see a varying number of rows per batch.
            network.vision_encoder.compile()
        logger.info("loaded %s (revision %s) on %s as %s", model, revision, torch_device, precision.name)
        return cls(
            network, processor, model_id=model, revision=revision, device=torch_device, dtype=torch_dtype,
            precision=precision,
            tracker_source=resolve_tracker(model, cache_dir),
        )

    def prepare(self, image: PIL.Image.Image) -> PreparedImage:
        """CPU preprocessing of one decoded RGB image (``self.preparer``, which loader processes run)."""
        return self.preparer(image)

    def segment(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds,
        masks: MaskDelivery = "full",
    ) -> list[list[PromptDetections]]:
        """Segment each image with its own prompts; ``result[i][j]`` is image i, prompt j.

        ``masks`` says what of the full-size masks crosses to the host; RLE, area and bbox always do.
        """
        return self.start_segment(images, prompts, thresholds, masks)()

    def start_segment(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds,
        masks: MaskDelivery = "full", staged: torch.Tensor | None = None,
    ) -> Callable[[], list[list[PromptDetections]]]:
        """``segment`` in two: the model's part now, under the model lock; the host's part (waiting for the
        results to land, assembling them) when the returned function is called, by whoever wants them while
        the model runs the next batch. ``staged``: what ``stage(images)`` returned, if it was called."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompt lists")
        if not images:
            return list
        with self._model_lock, torch.inference_mode(), self.precision.compute(self.device):
            # The staged pixels serve the whole batch; halves after an out-of-memory error are staged anew.
            finishers = self._split_on_oom(images, prompts, lambda part, asked: self._segment_batch(
                part, asked, thresholds, masks, staged if part is images else None))
        # The model is free for the next batch while this one's results land on the host and are assembled.
        return lambda: [found for finish in finishers for found in finish()]

    def warm_up(self, batch_size: int) -> list[int]:
        """Run every batch size torch.compile must see (blank images), so no chunk waits for a compilation.

        Returns the sizes run. Call at start-up, before the worker takes work.
        """
        side = self._input_side()
        blank = self.prepare(PIL.Image.new("RGB", (side, side)))
        sizes = compile_warmup_sizes(batch_size)
        for size in sizes:
            self.segment([blank] * size, [["warm-up"]] * size, Thresholds(score=1.0))
        return sizes

    def segment_visual(
        self, images: list[PreparedImage], requests: list[VisualRequest], thresholds: Thresholds,
        masks: MaskDelivery = "full",
    ) -> list[VisualResult]:
        """Segment each image with its text, exemplar and object prompts: one vision pass for all of them."""
        if len(images) != len(requests):
            raise ValueError(f"got {len(images)} images but {len(requests)} prompt requests")
        if not images:
            return []
        with self._model_lock, torch.inference_mode(), self.precision.compute(self.device):
            finishers = self._split_on_oom(images, requests, lambda part, asked: self._start_visual_batch(
                part, asked, thresholds, masks))
        return [found for finish in finishers for found in finish()]

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
        with self._model_lock, torch.inference_mode(), self.precision.compute(self.device):
            self._segment_batch([blank] * images, [prompts] * images, Thresholds(score=0.0, mask=0.5), "full")()
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        self._release_cached_memory()
        return peak

    def _input_side(self) -> int:
        size: Any = self.processor.image_processor.size
        return int(size["height"])

    def _split_on_oom(
        self, images: list[PreparedImage], asked: list[_Asked],
        run: Callable[[list[PreparedImage], list[_Asked]], Callable[[], list[_Found]]],
    ) -> list[Callable[[], list[_Found]]]:
        """``run`` over the batch; out of GPU memory, over its halves, recursively, down to one image.

        ``run`` queues the device work and returns what finishes it on the host; the finishers are returned
        in order, to be called after the model lock is released.
        """
        try:
            return [run(images, asked)]
        except torch.OutOfMemoryError:
            if len(images) == 1:
                raise
        # Retried outside the except block so the failed attempt's tensors (held by the traceback) are freed.
        self._release_cached_memory()
        half = len(images) // 2
        logger.warning(
            "out of GPU memory on %d images; retrying as %d + %d", len(images), half, len(images) - half
        )
        first = self._split_on_oom(images[:half], asked[:half], run)
        return first + self._split_on_oom(images[half:], asked[half:], run)

    def _start_visual_batch(
        self, images: list[PreparedImage], requests: list[VisualRequest], thresholds: Thresholds,
        masks: MaskDelivery,
    ) -> Callable[[], list[VisualResult]]:
        sizes_hw = [image.original_size_hw for image in images]
        return self.visual.start(self._stack(images), requests, sizes_hw, thresholds, masks)

    def _segment_batch(
        self, images: list[PreparedImage], prompts: list[list[str]], thresholds: Thresholds, masks: MaskDelivery,
        staged: torch.Tensor | None = None,
    ) -> _Finish:
        """One vision pass for the batch, then the detector over slices of its (image, prompt) rows.

        Returns what finishes the batch on the host (no model needed); the device work is queued.
        """
        rows = _Rows.of(images, prompts)
        if not rows.prompts:
            return lambda: [[] for _ in images]
        pixels = self._model_input(staged) if staged is not None else self._stack(images)
        vision = self._vision_features(pixels)
        pending: list[PendingDetections] = []
        done = 0
        while done < len(rows.prompts):
            part = self._detect_rows_within_limit(vision, rows.part(done, self.row_limit), thresholds, masks)
            if part is not None:
                pending.append(part[0])
                done += part[1]

        def finish() -> list[list[PromptDetections]]:
            flat = [found for part in pending for found in part.finish()]
            grouped: list[list[PromptDetections]] = []
            for image_prompts in prompts:
                grouped.append(flat[: len(image_prompts)])
                flat = flat[len(image_prompts) :]
            return grouped

        return finish

    def _detect_rows_within_limit(
        self, vision: Sam3VisionEncoderOutput, rows: _Rows, thresholds: Thresholds, masks: MaskDelivery
    ) -> tuple[PendingDetections, int] | None:
        """The detector over ``rows`` (and how many); out of memory, it lowers (and keeps) ``row_limit``."""
        try:
            return self._detect_rows(vision, rows, thresholds, masks), len(rows.prompts)
        except torch.OutOfMemoryError:
            if len(rows.prompts) == 1:
                raise
        # Outside the except block, so the failed attempt's tensors (held by the traceback) are freed.
        self._release_cached_memory()
        self.row_limit = len(rows.prompts) // 2
        logger.warning("out of GPU memory on %d image-prompt rows: at most %d per detector pass from now on",
                       len(rows.prompts), self.row_limit)
        return None

    def _vision_features(self, pixel_values: torch.Tensor) -> Sam3VisionEncoderOutput:
        vision: Sam3VisionEncoderOutput = self.model.get_vision_features(pixel_values=pixel_values)
        return vision

    def _detect_rows(
        self, vision: Sam3VisionEncoderOutput, rows: _Rows, thresholds: Thresholds, masks: MaskDelivery
    ) -> PendingDetections:
        """The detector and post-processing for ``rows`` (row k: image ``rows.images[k]``, its prompt)."""
        # Built on the host: no device sync.
        image_of_row = torch.tensor(rows.images, dtype=torch.long).to(self.device, non_blocking=True)
        features, attention_mask = self._text_rows(rows.prompts)
        outputs: Sam3ImageSegmentationOutput = self.model(
            vision_embeds=select_vision_rows(vision, image_of_row),
            text_embeds=as_text_embeds(features),
            attention_mask=attention_mask,
        )
        # On a CPU whose writer materialises, the masks are post-processed there, not on the model's core.
        return start_detections(outputs, rows.prompts, rows.sizes_hw, thresholds, masks,
                                defer=defers_on(self.device))

    def stage(self, images: list[PreparedImage]) -> torch.Tensor:
        """The batch's pixels stacked on the device: the host's copy, which needs no model. Called before the
        model's turn and passed to ``start_segment(staged=)``, it runs while another batch is on the model."""
        if images[0].pixel_values.dtype == torch.uint8:  # the loaders left normalising to the device
            return self._normalizer.staged([image.pixel_values for image in images], self.device)
        return stacked_on([image.pixel_values.to(self.dtype) for image in images], self.device)

    def _model_input(self, staged: torch.Tensor) -> torch.Tensor:
        return self._normalizer.normalised(staged, self.dtype) if staged.dtype == torch.uint8 else staged

    def _stack(self, images: list[PreparedImage]) -> torch.Tensor:
        return self._model_input(self.stage(images))

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
        # Copies, not views: a view would keep this whole call's features alive for as long as one is cached.
        return {
            prompt: _TextEmbedding(features[i : i + 1].clone(), tokens["attention_mask"][i : i + 1].clone())
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

