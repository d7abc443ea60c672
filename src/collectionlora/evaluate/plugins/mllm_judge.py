"""The paper's MLLM judge (docs/method.md 8.2): Bad Case Rate (BCR) and Valid Subject Alignment (VSA).

One case is one edit: the instruction, a reference template pair (the effect's visual ground truth), the test
pair and the effect's expert criteria. The BCR prompt asks whether the test result is a bad case; only when it
is not does the VSA prompt ask for a 1-5 identity score, and a bad case scores VSA 0. BCR and VSA are means
over cases (`summarize`). The endpoint is any OpenAI-compatible chat-completions server, called like the AOP
captioner (distill/prompting.py): stdlib HTTP, temperature 0, images as base64 PNG data URLs.

Replies must follow the asked JSON schema; a code fence or text around the object is tolerated. A reply that
does not parse, lacks a field or has a wrong type or range raises MllmJudgeError naming the field: nothing is
guessed. To count such cases instead of stopping, catch MllmJudgeError per case.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from collectionlora.config import MllmJudgeConfig
from collectionlora.errors import ConfigError
from collectionlora.evaluate.plugins.base import MllmJudgeError, one_line
from collectionlora.images import to_pil

VSA_MIN, VSA_MAX = 1, 5
VSA_BAD_CASE = 0  # the VSA of a bad case: the subject did not survive a valid edit
FENCE = re.compile(r"^```[\w-]*\s*(.*?)\s*```$", re.DOTALL)

# BCR (project page static/figures/BCR.tex, as summarised in docs/method.md 8.2). The four images follow the text
# in this order, each after a one-line label.
BCR_PROMPT = (
    "You are an expert judge of image-editing results for a specific visual effect.\n"
    "You are given four images, in this order:\n"
    "1. Reference template source: an original image.\n"
    "2. Reference template result: the same image after the effect was applied correctly. This template pair "
    "is the visual ground truth of the effect.\n"
    "3. Test source: the original test image.\n"
    "4. Test result: the image to judge, produced from the test source with the editing instruction below.\n"
    'Editing instruction: "{instruction}"\n'
    "Expert evaluation criteria for this effect:\n"
    "{criteria}\n"
    "Task: decide whether the test result is a bad case. Compare the test pair with the reference template pair "
    "and check the test result against the expert criteria. Flag a bad case only when the test result clearly "
    "violates the criteria; ignore minor texture issues and small imperfections.\n"
    "Output strict JSON only, with no other text, in exactly this form:\n"
    '{{"brief_reasoning": "<fewer than 20 words>", "is_bad_case": <true or false>}}'
)
BCR_IMAGES = ("Reference template source:", "Reference template result:", "Test source:", "Test result:")

# VSA (project page static/figures/VSA.tex, as summarised in docs/method.md 8.2).
VSA_PROMPT = (
    "You are an expert judge of subject identity in edited images.\n"
    "You are given two images, in this order: the test source (the original) and the test result, produced "
    "from the source with the editing instruction below.\n"
    'Editing instruction: "{instruction}"\n'
    "Task: rate how well the result preserves the identity of the source's subject. Judge semantic "
    "recognisability, not pixel alignment: changes of style, colour, texture or rendering that the instruction "
    "asks for are not identity loss.\n"
    "Scores:\n"
    "1: the subject is lost or unrecognisable.\n"
    "2: the subject is severely distorted.\n"
    "3: the subject is recognisable, but non-essential features are lost.\n"
    "4: identity is well preserved; changes are limited to the effect.\n"
    "5: the subject's demeanour and core features are perfectly preserved.\n"
    "Output strict JSON only, with no other text, in exactly this form:\n"
    '{{"brief_reasoning": "<fewer than 20 words>", "scores": <integer from 1 to 5>}}'
)
VSA_IMAGES = ("Test source:", "Test result:")


@dataclass(frozen=True)
class JudgeCase:
    """One edit to judge; images are [3, H, W] floats in [0, 1]; `case_id` names the case in errors."""

    case_id: str
    instruction: str
    criteria: str  # the effect's expert evaluation criteria
    template_source: Tensor
    template_result: Tensor
    source: Tensor
    result: Tensor

    def __post_init__(self) -> None:
        for name in ("instruction", "criteria"):
            if not getattr(self, name).strip():
                raise ValueError(f"judge case '{self.case_id}': {name} is empty")
        for name in ("template_source", "template_result", "source", "result"):
            image = getattr(self, name)
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"judge case '{self.case_id}': {name} must be [3, H, W], got {tuple(image.shape)}")


@dataclass(frozen=True)
class CaseVerdict:
    """The judge's answers for one case; `vsa` is 0 for a bad case, else 1-5."""

    case_id: str
    is_bad_case: bool
    bcr_reasoning: str
    vsa: int
    vsa_reasoning: str | None  # None when the VSA prompt was not asked (a bad case)


class MllmJudge:
    """BCR and VSA through an OpenAI-compatible chat endpoint; the API key is read once, when built."""

    def __init__(self, config: MllmJudgeConfig) -> None:
        if config.url is None or config.model is None:
            raise ConfigError("params.yaml: eval_plugins.mllm.url/model: the MLLM judge needs an endpoint url and model")
        self.config = config
        self.endpoint = f"{config.url.rstrip('/')}/chat/completions"
        self._key = None
        if config.api_key_env is not None:
            self._key = os.environ.get(config.api_key_env) or None
            if self._key is None:
                raise MllmJudgeError(
                    f"{self.endpoint}: environment variable {config.api_key_env} (eval_plugins.mllm.api_key_env) is not "
                    "set; export the API key, or set api_key_env: null for a server without authentication"
                )

    def judge(self, case: JudgeCase) -> CaseVerdict:
        """Both stages for one case: BCR, then VSA only when the case is not bad (a bad case scores 0)."""
        is_bad, bcr_reasoning = self.bad_case(case)
        if is_bad:
            return CaseVerdict(case.case_id, True, bcr_reasoning, VSA_BAD_CASE, None)
        score, vsa_reasoning = self.subject_alignment(case)
        return CaseVerdict(case.case_id, False, bcr_reasoning, score, vsa_reasoning)

    def bad_case(self, case: JudgeCase) -> tuple[bool, str]:
        """The BCR prompt: (is_bad_case, brief_reasoning)."""
        prompt = BCR_PROMPT.format(instruction=case.instruction.strip(), criteria=case.criteria.strip())
        images = (case.template_source, case.template_result, case.source, case.result)
        reply = self._ask("BCR", case.case_id, prompt, zip(BCR_IMAGES, images))
        try:
            return parse_bad_case(reply)
        except (ValueError, TypeError) as error:
            raise self._error("BCR", case.case_id, f"malformed reply: {error}") from error

    def subject_alignment(self, case: JudgeCase) -> tuple[int, str]:
        """The VSA prompt, asked whatever the BCR verdict: (score 1-5, brief_reasoning)."""
        prompt = VSA_PROMPT.format(instruction=case.instruction.strip())
        reply = self._ask("VSA", case.case_id, prompt, zip(VSA_IMAGES, (case.source, case.result)))
        try:
            return parse_alignment(reply)
        except (ValueError, TypeError) as error:
            raise self._error("VSA", case.case_id, f"malformed reply: {error}") from error

    def _ask(self, stage: str, case_id: str, prompt: str, images: Iterable[tuple[str, Tensor]]) -> str:
        """POST one user message (prompt, then each labelled image) and return the reply text."""
        content: list[dict] = [{"type": "text", "text": prompt}]
        for label, image in images:
            content += [{"type": "text", "text": label}, png_data_url_part(image)]
        body = {"model": self.config.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read(300).decode("utf-8", "replace")
            raise self._error(stage, case_id, f"HTTP {error.code} {error.reason} {detail}") from error
        except (OSError, http.client.HTTPException) as error:
            raise self._error(stage, case_id, f"request failed ({getattr(error, 'reason', error)})") from error
        try:
            answer = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise self._error(stage, case_id, f"malformed response ({error.__class__.__name__}: {error})") from error
        if not isinstance(answer, str):
            raise self._error(stage, case_id, f"malformed response (message content is {type(answer).__name__}, not text)")
        return answer

    def _error(self, stage: str, case_id: str, reason: str) -> MllmJudgeError:
        text = one_line(reason)
        if self._key:
            text = text.replace(self._key, "***")
        return MllmJudgeError(f"{self.endpoint}: {stage} for case '{case_id}': {text}")


def summarize(verdicts: Sequence[CaseVerdict]) -> dict[str, float]:
    """The paper's numbers over cases: BCR (share of bad cases, lower is better) and mean VSA (0-5)."""
    if not verdicts:
        raise ValueError("summarize: no verdicts")
    count = len(verdicts)
    return {
        "cases": float(count),
        "bcr": sum(v.is_bad_case for v in verdicts) / count,
        "vsa": sum(v.vsa for v in verdicts) / count,
    }


def parse_bad_case(reply: str) -> tuple[bool, str]:
    """(is_bad_case, brief_reasoning) from a BCR reply; ValueError or TypeError naming the field at fault."""
    data = parse_json_reply(reply)
    flag = data.get("is_bad_case")
    if not isinstance(flag, bool):
        raise TypeError(f"field 'is_bad_case' must be true or false, got {_shown(flag)}")
    return flag, _reasoning(data)


def parse_alignment(reply: str) -> tuple[int, str]:
    """(score 1-5, brief_reasoning) from a VSA reply; ValueError or TypeError naming the field at fault."""
    data = parse_json_reply(reply)
    score = data.get("scores")
    whole = isinstance(score, int) or (isinstance(score, float) and score.is_integer())
    if isinstance(score, bool) or not whole or not VSA_MIN <= score <= VSA_MAX:
        raise ValueError(f"field 'scores' must be an integer from {VSA_MIN} to {VSA_MAX}, got {_shown(score)}")
    return int(score), _reasoning(data)


def parse_json_reply(reply: str) -> dict:
    """The JSON object of a reply, inside a code fence or surrounded by text if need be; else ValueError/TypeError."""
    text = reply.strip()
    fenced = FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        try:
            data = json.loads(text[start : end + 1]) if 0 <= start < end else None
        except ValueError:
            data = None
        if data is None:
            raise ValueError(f"no JSON object in {one_line(reply, 80)!r}") from None
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    return data


def png_data_url_part(image: Tensor) -> dict:
    """An OpenAI chat `image_url` content part holding `image` [3, H, W] as a base64 PNG data URL."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def _reasoning(data: dict) -> str:
    reasoning = data.get("brief_reasoning")
    if not isinstance(reasoning, str):
        raise TypeError(f"field 'brief_reasoning' must be a string, got {_shown(reasoning)}")
    return reasoning.strip()


def _shown(value: object) -> str:
    return "nothing (missing or null)" if value is None else one_line(json.dumps(value), 60)
