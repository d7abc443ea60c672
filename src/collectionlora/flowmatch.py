"""Flow-matching training shared by base pretraining and effect-teacher LoRAs.

The loss is written the way the pipeline samples: x_t = (1 - sigma) x0 + sigma * noise, the
transformer sees (x_t tokens ++ condition tokens) at timestep sigma and regresses v = noise - x0
on the target tokens. sigma is logit-normal, which spends most updates at mid noise levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from collectionlora.models.backbone import Backbone, PromptEmbeds


@dataclass
class FlowBatch:
    """Packed target latents, packed condition latents and the instruction states of one batch."""

    x0: torch.Tensor
    condition: torch.Tensor
    text: PromptEmbeds


def flow_matching_loss(backbone: Backbone, batch: FlowBatch, generator: torch.Generator) -> torch.Tensor:
    size = batch.x0.shape[0]
    sigma = torch.sigmoid(torch.randn(size, generator=generator)).to(backbone.device, batch.x0.dtype)
    noise = backbone.noise_like(batch.x0, generator)
    x_t = (1 - sigma.view(-1, 1, 1)) * batch.x0 + sigma.view(-1, 1, 1) * noise
    prediction = backbone.velocity(x_t, sigma, batch.condition, batch.text)
    return F.mse_loss(prediction.float(), (noise - batch.x0).float())


def fit(
    backbone: Backbone,
    parameters: Sequence[torch.nn.Parameter],
    next_batch: Callable[[torch.Generator], FlowBatch],
    steps: int,
    lr: float,
    seed: int,
    description: str,
) -> list[float]:
    """AdamW on `parameters` (fp32 master weights, grad-norm clip 1) for `steps` flow-matching updates."""
    parameters = list(parameters)
    if not parameters or not all(p.requires_grad for p in parameters):
        raise ValueError(f"{description}: every parameter to train must require grad")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    backbone.transformer.train()
    losses = []
    with tqdm(range(steps), desc=description, leave=None, mininterval=2.0) as bar:  # None: kept unless nested (demo-bank teachers)
        for _ in bar:
            loss = flow_matching_loss(backbone, next_batch(generator), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    backbone.transformer.eval()
    return losses


def pair_batches(
    backbone: Backbone,
    sources: torch.Tensor,
    results: torch.Tensor,
    prompts: list[str],
    batch_size: int,
    prompt_dropout: float,
    empty_prompt: str,
) -> Callable[[torch.Generator], FlowBatch]:
    """Random minibatches over fixed (source, result, prompt) triples, latents and prompts encoded once.

    With probability `prompt_dropout` an item's prompt is replaced by `empty_prompt`, so that the
    trained model supports classifier-free guidance.
    """
    x0 = backbone.encode_images(results)
    condition = backbone.encode_images(sources)
    text = backbone.encode_prompts(prompts, sources)
    empty = backbone.encode_prompts([empty_prompt] * len(prompts), sources)

    def next_batch(generator: torch.Generator) -> FlowBatch:
        rows = torch.randint(0, x0.shape[0], (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < prompt_dropout
        chosen = text.index(rows).select(dropped, empty.index(rows))
        return FlowBatch(x0[rows], condition[rows], chosen)

    return next_batch
