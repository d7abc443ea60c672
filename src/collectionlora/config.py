"""Typed sections of params.yaml: the only place tunable values live.

Every field is required, so a value missing from params.yaml is an error naming the field, never
a silent default hidden in code.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from collectionlora.errors import ConfigError
from collectionlora.yamlfile import load_yaml, yaml_problem


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, so typos do not pass silently. Values are strict
    (YAML `true` is not the integer 1, "5" is not a number) and floats finite (`.inf` is no learning rate);
    only paths and tuples accept their YAML spelling (a string, a list): those fields say `strict=False`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class TinyArchitecture(Section):
    num_layers: int = Field(ge=1)
    attention_head_dim: int = Field(ge=4)
    num_attention_heads: int = Field(ge=1)
    joint_attention_dim: int = Field(ge=4)
    axes_dims_rope: tuple[int, int, int] = Field(strict=False)
    vae_factor: int = Field(ge=1)
    text_hidden_size: int = Field(ge=4)
    text_layers: int = Field(ge=1)
    text_heads: int = Field(ge=1)
    vocab_size: int = Field(ge=300)

    @field_validator("axes_dims_rope")
    @classmethod
    def _rope_covers_head(cls, value: tuple[int, int, int], info) -> tuple[int, int, int]:
        head = info.data.get("attention_head_dim")
        if head is not None and sum(value) != head:
            raise ValueError(f"must sum to attention_head_dim={head}, got {sum(value)}")
        return value


class BaseConfig(Section):
    model: str
    path: Path = Field(strict=False)
    pipeline: Literal["QwenImageEditPlusPipeline", "QwenImageEditPipeline"]
    device: str
    dtype: Literal["float32", "bfloat16", "float16"]
    resolution: int = Field(ge=16)
    threads: int = Field(ge=1)
    tiny: TinyArchitecture

    @property
    def is_embedded(self) -> bool:
        return self.model == "embedded"


class SamplingConfig(Section):
    shift: float = Field(gt=0)
    negative_prompt: str
    teacher_steps: int = Field(ge=1)
    teacher_cfg_scale: float = Field(ge=1.0)
    teacher_cfg_norm: bool
    student_timesteps: list[float] = Field(min_length=1)
    truncate_timesteps: bool

    @field_validator("student_timesteps")
    @classmethod
    def _decreasing_in_range(cls, value: list[float]) -> list[float]:
        if any(not 0 < t <= 1000 for t in value):
            raise ValueError("timesteps must lie in (0, 1000]")
        if any(a <= b for a, b in zip(value, value[1:])):
            raise ValueError("timesteps must be strictly decreasing")
        return value


class LoraConfig(Section):
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    targets: list[str] = Field(min_length=1)
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    prompt_dropout: float = Field(ge=0, le=1)
    save_dtype: Literal["float32", "bfloat16", "float16"]
    seed: int


class JudgeConfig(Section):
    width: int = Field(ge=4)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    lr: float = Field(gt=0)
    procedural_per_effect: int = Field(ge=0)
    holdout_per_effect: int = Field(ge=1)
    seed: int


class DemoBankConfig(Section):
    seed: int
    sizes: dict[str, int]
    pairs_per_effect: int = Field(ge=2)
    general_sources: int = Field(ge=1)
    eval_sources: int = Field(ge=1)
    base_steps: int = Field(ge=0)
    base_lr: float = Field(gt=0)
    base_batch_size: int = Field(ge=1)
    teacher_check_steps: int = Field(ge=1)
    teacher_check_cfg_scale: float = Field(ge=1.0)
    teacher_pass_rate: float = Field(ge=0, le=1)

    @field_validator("sizes")
    @classmethod
    def _has_default(cls, value: dict[str, int]) -> dict[str, int]:
        if "default" not in value or any(n < 1 for n in value.values()):
            raise ValueError("needs a 'default' size and positive sizes")
        return value


class BankConfig(Section):
    root: Path = Field(strict=False)
    manifest: Path = Field(strict=False)
    image_size: int = Field(ge=8)
    min_pairs: int = Field(ge=1)
    # validate refuses a teacher whose delta, ||(alpha/r) B@A||_F over the base weights' ||W||_F summed over
    # its adapted modules, is below this: it would edit nothing (loradelta.py)
    min_teacher_delta: float = Field(gt=0, lt=1)
    max_effects: int | None = Field(default=..., ge=1)  # only the manifest's first N effects (scaling runs); null = all
    effects: list[str] | None = Field(default=..., min_length=1)  # only these effect ids, in manifest order; null = all


class DemoConfig(Section):
    eval_images: int = Field(ge=1)
    grid_scale: int = Field(ge=1)
    out: Path = Field(strict=False)


class RolloutConfig(Section):
    """Teacher targets: the sampler is `sampling` (teacher_steps, teacher_cfg_scale); this says what to sample."""

    samples_per_source: int = Field(ge=1)  # seeds per training source (targets per pair source)
    batch_size: int = Field(ge=1)
    seed: int


class VlmConfig(Section):
    """An OpenAI-compatible chat endpoint for AOP captions; the key is read from `api_key_env`."""

    url: str | None  # base URL, e.g. http://127.0.0.1:8000/v1 (POST {url}/chat/completions)
    model: str | None
    api_key_env: str
    timeout_s: float = Field(gt=0)
    example_pairs: int = Field(ge=1)


class PromptingConfig(Section):
    """Asymmetric Orthogonal Prompting: the student's trigger + caption per effect."""

    aop: bool  # off (ablation): the student sees the teacher's own prompt
    trigger_seed: int
    trigger_candidates: int = Field(ge=1)  # random triggers tried per effect; the most orthogonal set wins
    suffix_length: tuple[int, int] = Field(strict=False)  # random alphanumeric suffix length range, inclusive
    captioner: Literal["template", "vlm"]
    vlm: VlmConfig

    @field_validator("suffix_length")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError("needs 1 <= low <= high")
        return value


class DistillConfig(Section):
    """Multi-teacher on-policy distillation (PDSR + AOP + C2F-DO); docs/method.md sections 2-5."""

    rank: int = Field(ge=1)  # student and critic LoRAs
    alpha: float = Field(gt=0)
    targets: list[str] = Field(min_length=1)
    max_steps: int = Field(ge=1)  # distillation iterations; the critic updates every iteration
    # TA-FM-only student updates (no DMD, no critic) before the max_steps iterations: a cheap cold
    # start; 0 = the paper (every term from the first step)
    anchor_steps: int = Field(ge=0)
    generator_every: int = Field(ge=1)  # generator update when step % generator_every == 0
    batch_size: int = Field(ge=1)  # items per step over all processes (each process takes an equal share)
    # data-parallel processes on this machine (distill/launch.py): on a CPU they split base.threads,
    # on CUDA each takes a GPU; under torchrun or a TrainJob the launcher's world size applies instead
    processes: int = Field(ge=1)
    # effects in one effect-stream step, each on its share of the global batch (which must hold them),
    # one teacher call per effect; the reference gets several from its one-effect-per-GPU ranks;
    # 1 = one effect per step
    effects_per_batch: int = Field(ge=1)
    # torch.compile the anchor phase's student forward and backward (one tensor shape: prompts padded to
    # the longest): faster per step after a one-off compile; needs a C++ compiler on the CPU (g++)
    compile_anchor: bool
    lr: float = Field(gt=0)
    critic_lr: float = Field(gt=0)
    # constant (paper, reference); cosine: both learning rates decay to 0 over the run's steps
    lr_schedule: Literal["constant", "cosine"]
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(gt=0)
    pdsr: bool  # off (ablation): effect stream only
    p_switch: float = Field(ge=0, le=1)  # probability of the effect stream
    route_every: int = Field(ge=1)  # 1 = a draw per step (paper); 20 = the reference's blocks
    sync_routing: bool  # the same draw on every rank (reference: false, per-rank draws)
    bs_weight: float = Field(ge=0)  # BS-DMD; 1 in the paper
    ts: bool
    ts_weight: float = Field(ge=0)
    ts_generator_last: int = Field(ge=1)  # TS generator time from the last N entries of the step list
    ts_critic_range: tuple[float, float] = Field(strict=False)  # TS critic time, pre-shift, [low, high)
    ta_fm: bool
    ta_fm_weight: float = Field(ge=0)
    ta_fm_repeats: int = Field(ge=1)  # TA-FM draws (time, noise) per target row per generator step; paper 1
    ta_fm_timestep: Literal["paper", "reference"]  # reference: shifted twice, lower-bounded by the BS time
    # true: the critic trains on the generator step's student samples until the next generator step
    # (fresh noise and time each update); reference (false): a fresh backward simulation every update
    critic_reuses_generator_sample: bool
    seed: int
    checkpoint_every: int = Field(ge=1)
    keep_checkpoints: int = Field(ge=1)
    max_nonfinite: int = Field(ge=1)  # consecutive non-finite losses before the run aborts
    log_every: int = Field(ge=1)
    save_dtype: Literal["float32", "bfloat16", "float16"]
    kohya_export: bool  # also write a kohya/ComfyUI key layout

    @field_validator("ts_critic_range")
    @classmethod
    def _in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 1000:
            raise ValueError("needs 0 <= low < high <= 1000")
        return value


class AccelerationConfig(Section):
    """The acceleration LoRA of a base (`collectionlora acceleration train`): the distill engine on the
    general stream alone; every other value comes from `distill`."""

    max_steps: int = Field(ge=1)
    seed: int


class FmAllInOneConfig(Section):
    """The "FM all-in-1" baseline: one LoRA fitted by flow matching to every teacher target with the student
    prompts (no DMD, no few-step training), sampled with the acceleration LoRA stacked on it."""

    # anchor: the distillation's anchor phase IS that fit (TA-FM alone, distill.anchor_steps x batch_size
    # rows): take its LoRA instead of training the same thing twice; train: fit it here with the fields below
    source: Literal["anchor", "train"]
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    seed: int


class MergesConfig(Section):
    """The "PEFT merges" baseline: the teachers merged into one LoRA per method (see merging.py)."""

    methods: list[Literal["linear", "ties", "dare_ties", "svd", "cat"]]
    weights: list[float] | None  # one per effect; null = 1 each (the merged LoRA must carry every effect)
    rank: int = Field(ge=1)  # rank after SVD truncation (svd, ties, dare_ties)
    density: float = Field(gt=0, le=1)  # share of entries kept (ties, dare_ties)
    majority_sign_method: Literal["total", "frequency"]
    seed: int  # DARE's random masks


class BaselinesConfig(Section):
    """The alternatives the student is compared with (`collectionlora baselines`)."""

    fm_all_in_one: FmAllInOneConfig
    merges: MergesConfig


class GateConfig(Section):
    """When a collection may be promoted: the student against the teachers and the alternatives."""

    student: str  # the method gated, e.g. student_8nfe
    teacher: str  # the reference method, e.g. teacher
    beat_bcr_of: list[str]  # the student's BCR must be below each of these methods' BCR
    bcr_margin: float = Field(ge=0)  # student BCR <= teacher BCR + margin
    accuracy_tolerance: float = Field(ge=0)  # student judge accuracy >= teacher's - tolerance
    effect_floor: float = Field(ge=0, le=1)  # every effect's student judge accuracy >= floor


EvalMethod = Literal["teacher", "cascade", "fm_all_in_one", "merges", "student", "fused"]


class EvaluateConfig(Section):
    """The evaluate stage: methods, cases, metrics settings and the promotion gate."""

    methods: list[EvalMethod] = Field(min_length=1)
    student_steps: list[int] = Field(min_length=1)
    fused_dtypes: list[Literal["float32", "bfloat16", "float16"]]
    eval_images: int | None = Field(default=..., ge=1)  # eval sources per effect; null = all
    stochastic_seeds: int = Field(ge=2)  # seeds per source for stochastic effects (Frechet distance, diversity)
    structure_quantile: float = Field(ge=0, le=1)
    samples_per_effect: int = Field(ge=1)  # eval sources per effect shown in samples.png
    cost_requests: int = Field(ge=1)  # simulated request stream for adapter loads/switches per request
    # processes editing effects side by side (evaluate/parallel.py), sharing base.threads; 1 = in process
    processes: int = Field(ge=1)
    seed: int
    gate: GateConfig


class SimilarityModelConfig(Section):
    """A local transformers checkpoint folder (config.json, weights, preprocessor_config.json); never downloaded."""

    enabled: bool
    path: Path | None = Field(strict=False)

    @model_validator(mode="after")
    def _enabled_needs_a_path(self) -> SimilarityModelConfig:
        if self.enabled and self.path is None:
            raise ValueError("enabled: true needs path (a local model folder)")
        return self


class MllmJudgeConfig(Section):
    """An OpenAI-compatible chat endpoint judging BCR and VSA (the paper: Qwen-VL-Max-Latest)."""

    enabled: bool
    url: str | None  # base URL; the judge POSTs {url}/chat/completions
    model: str | None
    api_key_env: str | None  # environment variable holding the key; null = no Authorization header
    timeout_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _enabled_needs_an_endpoint(self) -> MllmJudgeConfig:
        if self.enabled and (self.url is None or self.model is None):
            raise ValueError("enabled: true needs url and model")
        return self


class EvalPluginsConfig(Section):
    """Real-model metrics of docs/method.md 8.2: CLIP and DINO image similarity, and the BCR/VSA MLLM judge."""

    device: str  # where the CLIP and DINO models run: cpu | cuda | cuda:N
    batch_size: int = Field(ge=1)  # images per CLIP or DINO forward
    clip: SimilarityModelConfig
    dino: SimilarityModelConfig
    mllm: MllmJudgeConfig


class IncrementalConfig(Section):
    """Adding effects to an existing collection by a short warm-started run."""

    generator_steps_per_effect: int = Field(ge=1)
    replay: float = Field(ge=0, le=1)  # share of effect-stream batches drawn from the old effects


class TrackingConfig(Section):
    """MLflow; the environment's MLFLOW_TRACKING_URI, when set, wins over `uri`."""

    uri: str
    experiment: str = Field(min_length=1)


class RegistryConfig(Section):
    """The MLflow model registry: which registered model a collection becomes a version of."""

    # MLflow refuses '/' and ':' and '..'-like paths; models:/<name>@alias URIs also break on '@' and spaces.
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class KfpTolerationConfig(Section):
    """A Kubernetes toleration (value and effect optional, as in Kubernetes)."""

    key: str = Field(min_length=1)
    operator: Literal["Exists", "Equal"]
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @model_validator(mode="after")
    def _value_matches_operator(self) -> KfpTolerationConfig:
        if (self.operator == "Equal") != (self.value is not None):
            raise ValueError("a toleration has a value exactly when its operator is Equal")
        return self


class KfpResourcesConfig(Section):
    """Kubernetes requests (= limits) of a task: a CPU count string ("4", "500m") and a memory quantity."""

    cpu: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")


class KfpTaskConfig(KfpResourcesConfig):
    """Every task but distill; the ones that run the model (rollout, baselines, evaluate) get the accelerators."""

    accelerator_count: int = Field(ge=0)


class KfpDistillConfig(KfpResourcesConfig):
    """The distillation task: its accelerators, placement, retries and where its checkpoints live."""

    backend: Literal["task", "trainjob"]
    accelerator_type: str = Field(min_length=1)  # also the type of `task`'s accelerators
    accelerator_count: int = Field(ge=0)  # per node
    node_selector: dict[str, str]
    tolerations: list[KfpTolerationConfig]
    retries: int = Field(ge=0, le=10)
    backoff: str = Field(pattern=r"^[0-9]+[smh]$")
    timeout_s: int = Field(gt=0)
    checkpoint_pvc: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    checkpoint_mount: str = Field(pattern=r"^/")
    num_nodes: int = Field(ge=1)
    trainer_runtime: str


class KfpSecretsConfig(Section):
    """Kubernetes Secret names (never values): their keys become the tasks' environment variables."""

    s3: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    mlflow: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class KfpConfig(Section):
    """The Kubeflow pipeline (`collectionlora pipeline ...`): compile-time defaults and task settings."""

    image: str = Field(min_length=1)
    pipeline_name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    bank_uri: str | None
    rollout_parallelism: int = Field(ge=1)
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    service_account: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    config_map: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    secrets: KfpSecretsConfig
    task: KfpTaskConfig
    distill: KfpDistillConfig


class Params(Section):
    base: BaseConfig
    sampling: SamplingConfig
    lora: LoraConfig
    judge: JudgeConfig
    demo_bank: DemoBankConfig
    bank: BankConfig
    demo: DemoConfig
    rollout: RolloutConfig
    prompting: PromptingConfig
    distill: DistillConfig
    acceleration: AccelerationConfig
    incremental: IncrementalConfig
    baselines: BaselinesConfig
    evaluate: EvaluateConfig
    eval_plugins: EvalPluginsConfig
    tracking: TrackingConfig
    registry: RegistryConfig
    kfp: KfpConfig


def load_params(path: Path | str = "params.yaml", overrides: dict | None = None, sets: Sequence[str] = ()) -> Params:
    """Read and validate params.yaml; `overrides` is a nested dict merged on top (tests), then `sets`, the
    CLI's `--set section.key=value` items. An error names the file (or the `--set` item) and the field."""
    path = Path(path)
    raw = _read_params_file(path)
    if overrides:
        raw = merge(raw, overrides)
    applied = []
    for item in sets:
        keys, value = parse_set(item)
        raw = merge(raw, _nested(keys, value))
        applied.append((keys, item))
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        loc = tuple(str(part) for part in first["loc"])
        # the last --set that wrote this field (or a section holding it, or a value inside it) is to blame
        origin = next((f"--set {item!r}" for keys, item in reversed(applied) if _overlaps(keys, loc)), str(path))
        raise ConfigError(f"{origin}: {'.'.join(loc)}: {_problem(first)}") from error


def parse_set(item: str) -> tuple[tuple[str, ...], object]:
    """A `--set section.key=value` item as (key path, YAML value); a malformed one is a ConfigError naming it."""
    key, sep, text = item.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        return keys, load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({yaml_problem(error, with_line=False)})") from error


def _read_params_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read params ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {error.start})") from error
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {yaml_problem(error)}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return raw


def _nested(keys: tuple[str, ...], value: object) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _overlaps(keys: tuple[str, ...], loc: tuple[str, ...]) -> bool:
    shared = min(len(keys), len(loc))
    return keys[:shared] == loc[:shared]


def _problem(error: dict) -> str:
    """A pydantic error as the rest of the line: unknown keys suggest the nearest known one; a wrong
    value is shown as it was read (`true`, `inf`, a string)."""
    if error["type"] == "extra_forbidden":
        near = difflib.get_close_matches(str(error["loc"][-1]), _known_keys(tuple(error["loc"][:-1])), n=1)
        return "unknown key" + (f" (did you mean '{near[0]}'?)" if near else "")
    if error["type"] == "missing":
        return "missing key"
    given = error.get("input")
    return error["msg"] + ("" if isinstance(given, (dict, list, tuple)) else f" (got {given!r:.80})")


def _known_keys(loc: tuple) -> list[str]:
    """The keys of the params section at `loc` (empty for a free-form mapping)."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge: values of `extra` win, nested mappings merge."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_params(params: Params, path: Path) -> Path:
    """params as a params.yaml, for commands started in another process (torchrun, a TrainJob)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path
