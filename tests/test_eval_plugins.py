"""Real-model metric plugins: CLIP/DINO similarity from local folders, the BCR/VSA MLLM judge, the settings."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from fake_chat import FakeChatEndpoint, serving
from PIL import Image
from pydantic import ValidationError
from tiny_vision import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY,
    TINY_TOWER,
    processor_config,
    save_checkpoint,
)
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)

from collectionlora.config import load_params
from collectionlora.errors import ConfigError
from collectionlora.evaluate.plugins import (
    EvalPluginsConfig,
    ImageSimilarity,
    JudgeCase,
    MetricPluginError,
    MllmJudge,
    MllmJudgeError,
    load_clip,
    load_dino,
    load_plugins,
    summarize,
)
from collectionlora.evaluate.plugins.mllm_judge import parse_alignment, parse_bad_case
from collectionlora.images import from_pil


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random tiny checkpoints: CLIP vision+projection, a full CLIP, DINOv2, DINO v1 (ViT), CLIP without projection."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    clip_processor = processor_config("CLIPImageProcessor", CLIP_MEAN, CLIP_STD)
    dino_processor = processor_config("BitImageProcessor", IMAGENET_MEAN, IMAGENET_STD)
    vit_processor = processor_config("ViTImageProcessor", IMAGENET_MEAN, IMAGENET_STD)
    vit_processor |= {"size": {"height": 32, "width": 32}, "do_center_crop": False}  # as facebook/dino-vit*
    text = {**TINY_TOWER, "vocab_size": 99, "max_position_embeddings": 16}
    text |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    # a hub CLIP snapshot keeps projection_dim at the top level, not in its vision_config
    clip_vision = CLIPVisionConfig(**TINY, projection_dim=16)
    full_clip = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=16))
    return {
        "clip": save_checkpoint(CLIPVisionModelWithProjection(clip_vision), root / "clip", clip_processor),
        "clip_full": save_checkpoint(full_clip, root / "clip_full", clip_processor),
        "dinov2": save_checkpoint(Dinov2Model(Dinov2Config(**TINY)), root / "dinov2", dino_processor),
        "dino_vit": save_checkpoint(ViTModel(ViTConfig(**TINY), add_pooling_layer=False), root / "dino_vit", vit_processor),
        "clip_no_projection": save_checkpoint(CLIPVisionModel(CLIPVisionConfig(**TINY)), root / "clip_no_projection", clip_processor),
        "clip_no_processor": save_checkpoint(CLIPVisionModelWithProjection(clip_vision), root / "no_processor", None),
    }


def _images(seed: int, count: int = 3) -> torch.Tensor:
    """Non-square images at 8-bit levels, so resizing and centre-cropping are exercised."""
    levels = torch.randint(0, 256, (count, 3, 40, 48), generator=torch.Generator().manual_seed(seed))
    return levels / 255.0


LOADERS = {"clip": load_clip, "clip_full": load_clip, "dinov2": load_dino, "dino_vit": load_dino}


@pytest.mark.parametrize("name", list(LOADERS))
def test_similarity_is_one_for_identical_images_symmetric_and_deterministic(checkpoints, name):
    metric = LOADERS[name](checkpoints[name], "cpu", batch_size=2)  # 3 images: two forward chunks
    assert isinstance(metric, ImageSimilarity)
    first, second = _images(0), _images(1)

    same = metric(first, first.clone())
    assert same.shape == (3,) and same.dtype == torch.float32
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)

    scores = metric(first, second)
    assert torch.equal(scores, metric(second, first))  # symmetric
    assert torch.equal(scores, metric(first, second))  # deterministic within a process
    assert torch.equal(scores, LOADERS[name](checkpoints[name], "cpu", batch_size=2)(first, second))  # and across loads
    torch.testing.assert_close(scores, LOADERS[name](checkpoints[name], "cpu", batch_size=3)(first, second), atol=1e-6, rtol=0)
    assert (scores.abs() <= 1).all() and (scores < 1 - 1e-4).all()  # different images are not identical


def test_clip_uses_the_projected_embedding_of_a_full_checkpoint(checkpoints):
    """A hub CLIP snapshot holds text and vision towers; the plugin keeps the vision tower and its projection."""
    metric = load_clip(checkpoints["clip_full"], "cpu", batch_size=4)
    saved = CLIPModel.from_pretrained(checkpoints["clip_full"], local_files_only=True)
    assert torch.equal(metric.model.visual_projection.weight, saved.visual_projection.weight)
    assert metric.embed(_images(0)).shape == (3, 16)
    assert torch.allclose(metric.embed(_images(0)).norm(dim=-1), torch.ones(3))


def _one_line_error(call, *args) -> str:
    with pytest.raises(MetricPluginError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unusable_folders_are_one_line_errors_naming_the_path(checkpoints, tmp_path):
    missing = tmp_path / "no_such_model"
    message = _one_line_error(load_clip, missing, "cpu", 1)
    assert str(missing) in message and "not found" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    message = _one_line_error(load_dino, empty, "cpu", 1)
    assert str(empty) in message and "not a transformers model" in message

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{not json", encoding="utf-8")
    assert str(junk) in _one_line_error(load_clip, junk, "cpu", 1)

    message = _one_line_error(load_clip, checkpoints["dinov2"], "cpu", 1)
    assert str(checkpoints["dinov2"]) in message and "'dinov2'" in message
    message = _one_line_error(load_dino, checkpoints["clip"], "cpu", 1)
    assert "'clip_vision_model'" in message

    message = _one_line_error(load_clip, checkpoints["clip_no_processor"], "cpu", 1)
    assert str(checkpoints["clip_no_processor"]) in message and "preprocessor_config.json" in message

    # transformers would fill the absent projection with random values and only warn
    message = _one_line_error(load_clip, checkpoints["clip_no_projection"], "cpu", 1)
    assert "lacks" in message and "visual_projection" in message


def test_similarity_rejects_bad_batches(checkpoints):
    metric = load_clip(checkpoints["clip"], "cpu", batch_size=4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        metric(_images(0)[0], _images(1)[0])
    with pytest.raises(ValueError, match="3 images but 2 references"):
        metric(_images(0), _images(1)[:2])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        metric(_images(0) * 2, _images(1))


# ---- settings and the loader ----------------------------------------------------------------------------
DEFAULTS = load_params(REPO / "params.yaml").eval_plugins.model_dump(mode="json")  # everything off


def _settings(**sections: dict) -> EvalPluginsConfig:
    raw = json.loads(json.dumps(DEFAULTS))
    for name, values in sections.items():
        raw[name].update(values)
    return EvalPluginsConfig.model_validate(raw)


def test_plugins_are_off_by_default_and_load_when_enabled(checkpoints):
    plugins = load_plugins(_settings())
    assert plugins.enabled == [] and plugins.clip is plugins.dino is plugins.judge is None

    clip, dino = ({"enabled": True, "path": str(checkpoints[name])} for name in ("clip", "dinov2"))
    plugins = load_plugins(_settings(clip=clip, dino=dino))
    assert plugins.enabled == ["clip", "dino"]
    assert plugins.clip.name == "clip" and plugins.dino.name == "dino" and plugins.clip.batch_size == 16


def test_settings_reject_an_enabled_metric_without_weights_or_endpoint():
    with pytest.raises(ValidationError, match="needs path"):
        _settings(dino={"enabled": True})
    with pytest.raises(ValidationError, match="needs url and model"):
        _settings(mllm={"enabled": True, "url": "http://127.0.0.1:1/v1"})
    with pytest.raises(ValidationError, match="extra"):
        _settings(clip={"weights": "x"})
    with pytest.raises(ConfigError, match="eval_plugins.mllm.url"):
        MllmJudge(_settings().mllm)


# ---- the MLLM judge against a loopback OpenAI-compatible fake ----------------------------------------------
KEY_ENV = "COLLECTIONLORA_MLLM_API_KEY"
SECRET = "sk-judge-0123456789secret"
MODEL = "qwen-vl-max-latest"
INSTRUCTION = "Turn the cat into a watercolour painting."
CRITERIA = "The result must look painted with soft washes; the cat must remain a cat."


class FakeMllm(FakeChatEndpoint):
    """Answers with the next (status, reply text) in `replies`, wrapped as a chat completion or an error."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[tuple[int, str]] = []

    def reply(self, auth: str) -> tuple[int, str]:
        status, text = self.replies.pop(0)
        body = {"error": text} if status != 200 else {"choices": [{"message": {"role": "assistant", "content": text}}]}
        return status, json.dumps(body).replace("{auth}", auth)


@pytest.fixture
def fake_mllm(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with serving(FakeMllm(), monkeypatch) as fake:
        yield fake


def _judge(fake: FakeMllm, **changes) -> MllmJudge:
    return MllmJudge(_settings(mllm={"enabled": True, "url": fake.url, "model": MODEL, "timeout_s": 10, **changes}).mllm)


def _case(case_id: str = "watercolour/0007") -> JudgeCase:
    images = _images(5, count=4)[..., :16, :16]
    return JudgeCase(case_id, INSTRUCTION, CRITERIA, images[0], images[1], images[2], images[3])


def _sent_images(request: dict) -> list[torch.Tensor]:
    prefix = "data:image/png;base64,"
    (message,) = request["json"]["messages"]
    parts = [p for p in message["content"] if p["type"] == "image_url"]
    assert all(p["image_url"]["url"].startswith(prefix) for p in parts)
    return [from_pil(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"][len(prefix) :])))) for p in parts]


def _sent_text(request: dict) -> str:
    (message,) = request["json"]["messages"]
    return "\n".join(p["text"] for p in message["content"] if p["type"] == "text")


def test_a_good_case_asks_bcr_then_vsa_and_keeps_the_score(fake_mllm):
    fake_mllm.replies = [
        (200, '```json\n{"brief_reasoning": "Clear watercolour look; cat intact.", "is_bad_case": false}\n```'),
        (200, '{"brief_reasoning": "Same cat, painted.", "scores": 4}'),
    ]
    case = _case()
    verdict = _judge(fake_mllm).judge(case)
    assert (verdict.is_bad_case, verdict.vsa, verdict.case_id) == (False, 4, case.case_id)
    assert verdict.bcr_reasoning == "Clear watercolour look; cat intact." and verdict.vsa_reasoning == "Same cat, painted."

    bcr, vsa = fake_mllm.requests
    for request in (bcr, vsa):
        assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {SECRET}"
        assert request["json"]["model"] == MODEL and request["json"]["temperature"] == 0
        assert f'"{INSTRUCTION}"' in _sent_text(request)
    # BCR: template pair then test pair, with the effect's criteria and the strict JSON schema
    sent = _sent_images(bcr)
    expected = (case.template_source, case.template_result, case.source, case.result)
    assert len(sent) == 4 and all(torch.equal(a, b) for a, b in zip(sent, expected))
    text = _sent_text(bcr)
    assert CRITERIA in text and '"is_bad_case"' in text and "minor texture issues" in text and "ground truth" in text
    # VSA: the test pair only, the 1-5 rubric, no criteria
    sent = _sent_images(vsa)
    assert len(sent) == 2 and torch.equal(sent[0], case.source) and torch.equal(sent[1], case.result)
    text = _sent_text(vsa)
    assert '"scores"' in text and "semantic recognisability" in text and "5: " in text and CRITERIA not in text


def test_a_bad_case_scores_vsa_zero_without_a_second_call(fake_mllm):
    fake_mllm.replies = [(200, 'Verdict: {"brief_reasoning": "No watercolour effect visible.", "is_bad_case": true}')]
    verdict = _judge(fake_mllm).judge(_case())
    assert (verdict.is_bad_case, verdict.vsa, verdict.vsa_reasoning) == (True, 0, None)
    assert len(fake_mllm.requests) == 1

    good_replies = ('{"brief_reasoning": "ok", "is_bad_case": false}', '{"brief_reasoning": "ok", "scores": 5.0}')
    fake_mllm.replies = [(200, reply) for reply in good_replies]
    good = _judge(fake_mllm).judge(_case("watercolour/0008"))
    assert summarize([verdict, good]) == {"cases": 2.0, "bcr": 0.5, "vsa": 2.5}


@pytest.mark.parametrize(
    ("replies", "stage", "field"),
    [
        (['{"brief_reasoning": "x", "is_bad_case": "no"}'], "BCR", "'is_bad_case'"),
        (['{"is_bad_case": false}'], "BCR", "'brief_reasoning'"),
        (["I cannot judge these images."], "BCR", "no JSON object"),
        (['["brief_reasoning", false]'], "BCR", "expected a JSON object"),
        (['{"brief_reasoning": "x", "is_bad_case": false}', '{"brief_reasoning": "x", "scores": 7}'], "VSA", "'scores'"),
        (['{"brief_reasoning": "x", "is_bad_case": false}', '{"brief_reasoning": "x", "scores": "4"}'], "VSA", "'scores'"),
        (['{"brief_reasoning": "x", "is_bad_case": false}', '{"brief_reasoning": "x", "scores": true}'], "VSA", "'scores'"),
    ],
)
def test_malformed_replies_are_one_line_errors_naming_the_field(fake_mllm, replies, stage, field):
    fake_mllm.replies = [(200, reply) for reply in replies]
    with pytest.raises(MllmJudgeError) as caught:
        _judge(fake_mllm).judge(_case())
    message = str(caught.value)
    assert "\n" not in message and field in message and f"{stage} for case 'watercolour/0007'" in message
    assert "malformed reply" in message and f"{fake_mllm.url}/chat/completions" in message


def test_http_errors_are_one_line_and_hide_the_key(fake_mllm):
    fake_mllm.replies = [(500, "overloaded, key {auth}")]
    with pytest.raises(MllmJudgeError) as caught:
        _judge(fake_mllm).judge(_case())
    message = str(caught.value)
    assert "HTTP 500" in message and "overloaded" in message and SECRET not in message and "\n" not in message


def test_the_api_key_comes_from_the_named_environment_variable(fake_mllm, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MllmJudgeError, match=f"environment variable {KEY_ENV} .*is not set"):
        _judge(fake_mllm)
    assert fake_mllm.requests == []

    monkeypatch.setenv("OTHER_KEY", "sk-other")
    fake_mllm.replies = [(200, '{"brief_reasoning": "x", "is_bad_case": true}')] * 2
    _judge(fake_mllm, api_key_env="OTHER_KEY").bad_case(_case())
    _judge(fake_mllm, api_key_env=None).bad_case(_case())  # a local server without authentication
    assert [r["auth"] for r in fake_mllm.requests] == ["Bearer sk-other", None]


def test_reply_parsing_accepts_fences_and_rejects_out_of_range_scores():
    assert parse_bad_case('```\n{"brief_reasoning": " fine ", "is_bad_case": false}\n```') == (False, "fine")
    assert parse_alignment('Here you go:\n```json\n{"brief_reasoning": "r", "scores": 1}\n```') == (1, "r")
    for bad in (0, 6, 3.5, None):
        with pytest.raises(ValueError, match="'scores' must be an integer from 1 to 5"):
            parse_alignment(json.dumps({"brief_reasoning": "r", "scores": bad}))
