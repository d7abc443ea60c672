"""One wrapper over a diffusers Qwen-Image-Edit pipeline, used by every stage.

It speaks the pipeline's own conventions (prompt template, packed latents, sigma-valued timesteps)
so that whatever a stage trains is exactly what a stock `QwenImageEditPlusPipeline` runs later.
Flow matching: x_t = (1 - sigma) x0 + sigma * noise, the transformer predicts v = noise - x0, so
x0 = x_t - sigma * v.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    calculate_dimensions,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

import collectionlora.models.pixel_vae  # noqa: F401  (diffusers resolves the embedded VAE class by module)
from collectionlora.config import BaseConfig
from collectionlora.errors import ConfigError
from collectionlora.images import to_pil
from collectionlora.models.compat import (
    condition_area,
    processor_override,
)

PIPELINES = {"QwenImageEditPlusPipeline": QwenImageEditPlusPipeline, "QwenImageEditPipeline": QwenImageEditPipeline}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Area of the condition image shown to the text encoder by the real Qwen-Image-Edit-Plus pipeline.
REAL_TEXT_CONDITION_PIXELS = 384 * 384


@dataclass
class PromptEmbeds:
    """Text-encoder states for a batch; `mask` is None when no row is padded (the pipeline's convention)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def stack(rows: list[torch.Tensor]) -> PromptEmbeds:
        """Pad per-item [L_i, D] states to one batch with a mask, as the pipeline does."""
        longest = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
        if all(r.shape[0] == longest for r in rows):
            return PromptEmbeds(embeds, None)
        mask = torch.stack(
            [torch.cat([torch.ones(r.shape[0]), torch.zeros(longest - r.shape[0])]) for r in rows]
        ).to(device=embeds.device, dtype=torch.long)
        return PromptEmbeds(embeds, mask)

    def unpadded(self) -> list[torch.Tensor]:
        if self.mask is None:
            return list(self.embeds)
        return [e[: int(m.sum())] for e, m in zip(self.embeds, self.mask)]

    def padded(self, length: int) -> PromptEmbeds:
        """Every row padded to `length` tokens with a mask: one tensor shape whatever the prompts, for a
        compiled transformer (the mask hides the padding, so the edit is the same up to float rounding)."""
        rows = self.unpadded()
        if max(r.shape[0] for r in rows) > length:
            raise ValueError(f"a prompt has more than {length} tokens")
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.stack([torch.arange(length, device=embeds.device) < r.shape[0] for r in rows]).long()
        return PromptEmbeds(embeds, mask)

    def cat(self, other: PromptEmbeds) -> PromptEmbeds:
        return PromptEmbeds.stack(self.unpadded() + other.unpadded())

    def select(self, take_other: torch.Tensor, other: PromptEmbeds) -> PromptEmbeds:
        """Row i from `other` where take_other[i], else from self (prompt dropout)."""
        mine, theirs = self.unpadded(), other.unpadded()
        return PromptEmbeds.stack([theirs[i] if flag else mine[i] for i, flag in enumerate(take_other.tolist())])

    def index(self, rows: torch.Tensor) -> PromptEmbeds:
        items = self.unpadded()
        return PromptEmbeds.stack([items[i] for i in rows.tolist()])


def image_digest(image: torch.Tensor) -> str:
    """Content key of an image tensor, for the prompt cache."""
    return hashlib.sha256(image.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class Backbone:
    """The base editing model with conveniences for training and sampling.

    The LoRA adapters (student, critic, teachers) live on `self.transformer`; see adapters.py.
    """

    def __init__(self, pipe: DiffusionPipeline, config: BaseConfig, embedded: bool):
        torch.set_num_threads(config.threads)
        self.pipe = pipe
        self.config = config
        self.embedded = embedded
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.resolution = config.resolution
        self.transformer = pipe.transformer
        self.vae_factor = pipe.vae_scale_factor
        self.text_condition_pixels = config.resolution**2 if embedded else REAL_TEXT_CONDITION_PIXELS
        self._prompt_cache: dict[tuple[str, str], torch.Tensor] = {}
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.text_encoder, pipe.vae, pipe.transformer):
            module.requires_grad_(False)
            module.eval()

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: BaseConfig, path: Path | None = None) -> Backbone:
        """Load the embedded pipeline from `path` (default `config.path`) or a real one by path or hub id."""
        pipeline_class = PIPELINES[config.pipeline]
        dtype = DTYPES[config.dtype]
        embedded = config.is_embedded
        location = Path(path or config.path) if embedded else _resolve_model(config.model)
        if not (location / "model_index.json").is_file():
            raise ConfigError(f"{location}: no model_index.json (base.model / base.path must name a diffusers pipeline folder)")
        extra = processor_override(location)
        with _quiet_embedded_load(embedded):
            pipe = pipeline_class.from_pretrained(location, dtype=dtype, **extra)
        pipe.to(config.device)
        return cls(pipe, config, embedded)

    @contextlib.contextmanager
    def stock_call(self) -> Iterator[DiffusionPipeline]:
        """The stock pipeline, with the condition-size workaround when it is the embedded tiny one."""
        if self.embedded:
            with condition_area(self.resolution**2):
                yield self.pipe
        else:
            yield self.pipe

    # ---- text ----------------------------------------------------------------------------------
    def clear_prompt_cache(self) -> None:
        """Forget encoded prompts: a server encodes each request's prompt, so latency benchmarks clear it."""
        self._prompt_cache.clear()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], sources: torch.Tensor) -> PromptEmbeds:
        """Encode (instruction, condition image) pairs as the pipeline does; cached by text and image."""
        if len(prompts) != sources.shape[0]:
            raise ValueError(f"encode_prompts: {len(prompts)} prompts for {sources.shape[0]} images")
        rows = []
        for prompt, source in zip(prompts, sources):
            key = (prompt, image_digest(source))
            if key not in self._prompt_cache:
                self._prompt_cache[key] = self._encode_one(prompt, source)
            rows.append(self._prompt_cache[key])
        return PromptEmbeds.stack(rows)

    def _encode_one(self, prompt: str, source: torch.Tensor) -> torch.Tensor:
        pil = to_pil(source)
        width, height = calculate_dimensions(self.text_condition_pixels, pil.width / pil.height)
        condition = self.pipe.image_processor.resize(pil, height, width)
        embeds, _ = self.pipe.encode_prompt(prompt=[prompt], image=[condition], device=self.device)
        return embeds[0].to(self.dtype)

    # ---- images <-> packed latents -------------------------------------------------------------
    @property
    def latent_hw(self) -> tuple[int, int]:
        side = self.resolution // self.vae_factor
        return side, side

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> packed, normalised latents [B, tokens, channels]."""
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"expected {self.resolution}x{self.resolution} images, got {tuple(images.shape[-2:])}")
        pixels = (images.to(self.device, self.dtype) * 2 - 1).unsqueeze(2)
        latents = self.pipe._encode_vae_image(pixels, generator=None)
        batch, channels, _, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    @torch.no_grad()
    def decode_latents(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed latents -> [B, 3, H, W] images in [0, 1] (float32, on CPU)."""
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(packed, self.resolution, self.resolution, self.vae_factor)
        latents = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        image = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return ((image.float() + 1) / 2).clamp(0, 1).cpu()

    def noise_like(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise drawn on CPU from `generator` (device-independent and reproducible)."""
        return torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)

    # ---- the denoiser --------------------------------------------------------------------------
    def velocity(
        self, x_t: torch.Tensor, sigma: torch.Tensor, condition: torch.Tensor, text: PromptEmbeds, transformer: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """The transformer's flow prediction v = noise - x0 for the target tokens (active adapters apply);
        `transformer`: a compiled wrapper of `self.transformer` to call instead."""
        batch, tokens = x_t.shape[:2]
        height, width = self.latent_hw
        shapes = [[(1, height // 2, width // 2), (1, height // 2, width // 2)]] * batch
        sigma = sigma.to(self.device, x_t.dtype).expand(batch) if sigma.dim() == 0 else sigma.to(self.device, x_t.dtype)
        out = (self.transformer if transformer is None else transformer)(
            hidden_states=torch.cat([x_t, condition], dim=1),
            timestep=sigma,
            encoder_hidden_states=text.embeds,
            encoder_hidden_states_mask=text.mask,
            img_shapes=shapes,
            return_dict=False,
        )[0]
        return out[:, :tokens]

    def guided_velocity(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        condition: torch.Tensor,
        text: PromptEmbeds,
        uncond: PromptEmbeds | None,
        scale: float,
        norm_rescale: bool,
    ) -> torch.Tensor:
        """Classifier-free guidance, standard convention: uncond + scale * (cond - uncond).

        scale 1 (or no uncond) is one forward. The reference's `real_guidance_scale` g means scale g + 1.
        `norm_rescale` is the Qwen pipeline's rescale of the guided prediction to the conditional norm.
        """
        if uncond is None or scale == 1.0:
            return self.velocity(x_t, sigma, condition, text)
        both = self.velocity(
            torch.cat([x_t, x_t]), torch.cat([_batched(sigma, x_t), _batched(sigma, x_t)]),
            torch.cat([condition, condition]), text.cat(uncond),
        )
        cond, neg = both.chunk(2)
        guided = neg + scale * (cond - neg)
        if norm_rescale:
            guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return guided

    def predict_x0(self, x_t: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        return x_t - _batched(sigma, x_t).view(-1, 1, 1) * velocity


@contextlib.contextmanager
def _quiet_embedded_load(embedded: bool) -> Iterator[None]:
    """The embedded pipeline's VAE is knowingly not an AutoencoderKLQwenImage; silence that one warning
    and the loading bars for it. A real model loads with diffusers' normal logging."""
    if not embedded:
        yield
        return
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def _batched(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = sigma.to(like.device, like.dtype)
    return sigma.expand(like.shape[0]) if sigma.dim() == 0 else sigma


def _resolve_model(model: str) -> Path:
    """A local folder, or a hub id resolved from the local cache (HF_HUB_OFFLINE=1 forbids downloads)."""
    if Path(model).exists():
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model))
    except Exception as error:  # the hub client raises many types; all mean "not available here"
        raise ConfigError(f"params.yaml: base.model: cannot resolve {model!r} ({error.__class__.__name__}: {error})") from error

