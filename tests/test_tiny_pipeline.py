"""The embedded tiny Qwen-Image-Edit-Plus pipeline: built offline, saved and reloaded, and our
backbone speaks exactly the stock pipeline's conventions."""

from __future__ import annotations

import json

import torch

from collectionlora.effects import make_sources
from collectionlora.images import to_pil
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_student


def stock_edit(backbone: Backbone, source: torch.Tensor, prompt: str, latents: torch.Tensor, steps: int) -> torch.Tensor:
    with backbone.stock_call() as pipe:
        out = pipe(
            image=[to_pil(source)], prompt=prompt, height=32, width=32, num_inference_steps=steps,
            latents=latents, output_type="pt",
        )
    return out.images


def test_save_load_round_trip_is_bit_identical(backbone, tiny_params, tmp_path):
    source = make_sources("eval", 1, 32, 0)[0]
    noise = torch.randn(1, 64, 48, generator=torch.Generator().manual_seed(1))
    before = stock_edit(backbone, source, "Convert the photo to black and white", noise, 2)
    backbone.pipe.save_pretrained(tmp_path / "copy")
    reloaded = Backbone.load(tiny_params.base, tmp_path / "copy")
    after = stock_edit(reloaded, source, "Convert the photo to black and white", noise, 2)
    assert torch.equal(before, after)
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]


def test_model_is_tiny_and_tokenizer_prefix_matches_the_pipeline_drop(backbone):
    params = sum(p.numel() for p in backbone.transformer.parameters())
    assert 0.5e6 < params < 3e6
    pipe = backbone.pipe
    prefix = pipe.prompt_template_encode.split("{}")[0] + "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
    tokens = len(pipe.tokenizer(prefix)["input_ids"])
    # The pipeline drops the first 64 tokens (sized for the real tokenizer); the fitted BPE keeps the
    # system prompt close to that, so only a few template tokens leak into the text sequence.
    assert 55 <= tokens <= 75, tokens


def test_backbone_one_step_equals_the_stock_pipeline(backbone):
    """A 1-step stock call from given latents is x - v at sigma 1: the student's x0 prediction at t=1000."""
    sources = make_sources("eval", 2, 32, 3)
    prompt = "Turn the photo into a warm sepia-toned vintage print"
    ours = sample_student(backbone, sources, [prompt] * 2, seeds=[5, 6], timesteps=[1000.0]).images
    for i, seed in enumerate([5, 6]):
        noise = torch.randn(1, 64, 48, generator=torch.Generator().manual_seed(seed))
        stock = stock_edit(backbone, sources[i], prompt, noise, 1)
        assert torch.allclose(stock[0], ours[i], atol=1e-5), (stock[0] - ours[i]).abs().max()


def test_vae_round_trip_is_exact_and_prompt_cache_hits(backbone):
    images = make_sources("eval", 4, 32, 0)
    assert torch.allclose(backbone.decode_latents(backbone.encode_images(images)), images, atol=1e-6)
    backbone.encode_prompts(["Make it pop"] * 4, images)
    cached = len(backbone._prompt_cache)
    again = backbone.encode_prompts(["Make it pop"] * 4, images)
    assert len(backbone._prompt_cache) == cached == 4
    other = backbone.encode_prompts(["Make it calm"] * 4, images)
    assert not torch.equal(again.embeds[:, : other.embeds.shape[1]], other.embeds[:, : again.embeds.shape[1]])

