"""AOP: unique triggers chosen for orthogonal student prompts, captions (template and VLM), composition."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
import torch
from fake_chat import FakeChatEndpoint, serving
from PIL import Image

from collectionlora.distill.prompting import (
    PromptPlan,
    compose_prompt,
    extend_plan,
    plan_prompts,
    template_caption,
    trigger_candidates,
)
from collectionlora.errors import CaptionError, ConfigError
from collectionlora.images import from_pil

EFFECTS = [
    ("grayscale", "Convert the photo to black and white"),
    ("brighten", "Brighten the photo as if it were overexposed."),
    ("blur", "Blur the photo softly as if it were out of focus"),
    ("crt_scanlines", "Add dark CRT scanlines across every other row"),
]
TRIGGER = re.compile(r"^<(?P<effect>\w+)_(?P<suffix>[A-Za-z0-9]+)>$")
KEY_ENV = "COLLECTIONLORA_VLM_API_KEY"
SECRET = "sk-test-0123456789secret"


def test_triggers_are_unique_well_formed_and_stable(backbone, tiny_params):
    config = tiny_params.prompting
    plan = plan_prompts(backbone, EFFECTS[:3], config)
    low, high = config.suffix_length
    for row, (effect, _) in zip(plan.effects, EFFECTS):
        match = TRIGGER.match(row.trigger)
        assert match and match["effect"] == effect and low <= len(match["suffix"]) <= high
        assert row.trigger in trigger_candidates(effect, config)
    assert len({row.trigger for row in plan.effects}) == 3
    # Pinned: a collection's triggers are reproducible from params.yaml in any later process.
    assert trigger_candidates("grayscale", config)[0] == "<grayscale_8ChUS>"
    assert plan_prompts(backbone, EFFECTS[:3], config) == plan

    grown = extend_plan(backbone, plan, EFFECTS[3:], config)
    assert grown.effects[:3] == plan.effects
    assert grown.effects[3].trigger in trigger_candidates("crt_scanlines", config)
    assert len({row.trigger for row in grown.effects}) == 4


def test_selection_lowers_the_largest_cosine(backbone, tiny_params):
    plan = plan_prompts(backbone, EFFECTS, tiny_params.prompting.model_copy(update={"trigger_candidates": 8}))
    cosines = plan.max_cosine
    assert set(cosines) == {"teacher_prompts", "before", "after"}
    assert all(-1.0 <= value <= 1.0 for value in cosines.values())
    assert cosines["after"] <= cosines["before"] + 1e-12
    assert cosines["after"] < cosines["before"]  # eight candidates leave room to improve


def test_student_prompt_is_trigger_then_caption_and_aop_off_is_the_teacher_prompt(backbone, tiny_params):
    plan = plan_prompts(backbone, EFFECTS[:2], tiny_params.prompting)
    for row in plan.effects:
        assert row.student_prompt == f"{row.trigger} {row.caption}" == plan.student(row.effect)
        assert row.caption == template_caption(row.teacher_prompt) != row.teacher_prompt
    assert plan.effects[1].caption == "Transform the image: brighten the photo as if it were overexposed, leaving everything else unchanged."
    assert template_caption("CRT scanlines everywhere.").startswith("Transform the image: CRT scanlines everywhere,")

    off = plan_prompts(backbone, EFFECTS[:2], tiny_params.prompting.model_copy(update={"aop": False}))
    assert [(r.trigger, r.student_prompt) for r in off.effects] == [(None, p) for _, p in EFFECTS[:2]]
    with pytest.raises(ConfigError, match="prompting.aop/captioner"):
        extend_plan(backbone, plan, EFFECTS[2:3], tiny_params.prompting.model_copy(update={"aop": False}))


def test_plan_round_trips_through_json_and_composes(backbone, tiny_params):
    plan = plan_prompts(backbone, EFFECTS[:2], tiny_params.prompting)
    assert PromptPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    first, then = plan.effects
    composed = compose_prompt(first.student_prompt, then.student_prompt)
    assert composed.startswith(f"Please apply {first.trigger} ") and " and then apply " in composed
    assert then.trigger in composed and composed.endswith("unchanged.")


# ---- the VLM captioner against a loopback OpenAI-compatible fake ----------------------------------
class FakeVlm(FakeChatEndpoint):
    """Answers with `status` and `body` (which may echo the Authorization header as {auth})."""

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.body = json.dumps({"choices": [{"message": {"content": ' "Turn the pet black and white."\n'}}]})

    def reply(self, auth: str) -> tuple[int, str]:
        return self.status, self.body.replace("{auth}", auth)


@pytest.fixture
def fake_vlm(monkeypatch):
    with serving(FakeVlm(), monkeypatch) as fake:
        yield fake


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Three distinct pairs at 8-bit levels, so a PNG round trip is exact."""
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (3, 3, 16, 16), generator=generator)
    return levels / 255.0, (255 - levels) / 255.0


def _decode(part: dict) -> torch.Tensor:
    prefix = "data:image/png;base64,"
    url = part["image_url"]["url"]
    assert part["type"] == "image_url" and url.startswith(prefix)
    return from_pil(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))))


def test_vlm_captioner_sends_pairs_and_uses_the_answer(backbone, tiny_params, fake_vlm, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    vlm = tiny_params.prompting.vlm.model_copy(update={"url": fake_vlm.url, "model": "qwen-vl-max-latest", "timeout_s": 10})
    config = tiny_params.prompting.model_copy(update={"captioner": "vlm", "vlm": vlm})
    sources, results = _pairs()
    plan = plan_prompts(backbone, EFFECTS[:1], config, lambda effect: (sources, results))

    (request,) = fake_vlm.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {SECRET}"
    body = request["json"]
    assert body["model"] == "qwen-vl-max-latest" and body["temperature"] == 0
    (message,) = body["messages"]
    texts = [p["text"] for p in message["content"] if p["type"] == "text"]
    assert any(EFFECTS[0][1] in text for text in texts) and "generic categories" in texts[0]
    images = [_decode(p) for p in message["content"] if p["type"] != "text"]
    assert len(images) == 2 * vlm.example_pairs
    picked = []
    for source, result in zip(images[::2], images[1::2]):
        picked.append(next(i for i in range(3) if torch.equal(sources[i], source)))
        assert torch.equal(results[picked[-1]], result)
    assert len(set(picked)) == vlm.example_pairs
    assert plan.captioner == "vlm" and plan.effects[0].caption == "Turn the pet black and white."
    assert plan.effects[0].student_prompt == f"{plan.effects[0].trigger} Turn the pet black and white."

    monkeypatch.delenv(KEY_ENV)
    plan_prompts(backbone, EFFECTS[1:2], config, lambda effect: (sources, results))
    assert fake_vlm.requests[-1]["auth"] is None


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [(500, '{"error": {"message": "overloaded, key {auth}"}}', "HTTP 500"), (200, "{not json", "malformed response")],
)
def test_vlm_failures_are_one_line_caption_errors_without_the_key(backbone, tiny_params, fake_vlm, monkeypatch, status, body, reason):
    monkeypatch.setenv(KEY_ENV, SECRET)
    fake_vlm.status, fake_vlm.body = status, body
    vlm = tiny_params.prompting.vlm.model_copy(update={"url": fake_vlm.url, "model": "m", "timeout_s": 10})
    config = tiny_params.prompting.model_copy(update={"captioner": "vlm", "vlm": vlm})
    with pytest.raises(CaptionError) as caught:
        plan_prompts(backbone, EFFECTS[:1], config, lambda effect: _pairs())
    message = str(caught.value)
    assert "\n" not in message and reason in message and SECRET not in message
    assert f"{fake_vlm.url}/chat/completions" in message and "'grayscale'" in message


def test_vlm_captioner_needs_an_endpoint(backbone, tiny_params):
    config = tiny_params.prompting.model_copy(update={"captioner": "vlm"})
    with pytest.raises(ConfigError, match=r"params.yaml: prompting.vlm.url"):
        plan_prompts(backbone, EFFECTS[:1], config, lambda effect: _pairs())
