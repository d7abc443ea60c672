"""The `collectionlora` command line: one command per stage plus the demo-bank and teacher tools.

Every command reads params.yaml (`--params`), accepts `--set section.key=value` overrides, and
turns a project error into one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer

# Nothing may reach the network at run time: no hub downloads, no telemetry.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_name, _value)

from collectionlora.config import Params, load_params
from collectionlora.errors import CollectionLoraError, ConfigError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
effects_app = typer.Typer(help="The procedural effect catalog.", no_args_is_help=True)
bank_app = typer.Typer(help="The embedded demo effect bank.", no_args_is_help=True)
teachers_app = typer.Typer(help="Effect-teacher LoRAs.", no_args_is_help=True)
app.add_typer(effects_app, name="effects")
app.add_typer(bank_app, name="demo-bank")
app.add_typer(teachers_app, name="teachers")
judge_app = typer.Typer(help="The effect judge.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")
experiment_app = typer.Typer(help="The paper's tables as runnable experiments (experiments.py).", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")
acceleration_app = typer.Typer(help="The base's acceleration (few-step) LoRA.", no_args_is_help=True)
app.add_typer(acceleration_app, name="acceleration")
registry_app = typer.Typer(help="The MLflow model registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
pipeline_app = typer.Typer(help="The Kubeflow pipeline: compile, upload, run on a cluster, or run locally.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read.")]
SetOption = Annotated[list[str], typer.Option("--set", "-S", help="Override a value: section.key=value (YAML value).")]


def one_line_errors(command: Callable) -> Callable:
    """Project errors become one line on stderr and exit 1; nothing else is swallowed."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CollectionLoraError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def params_from(path: Path, sets: list[str] | None) -> Params:
    """params.yaml with the command's `--set` items on top; an error names the file or the item."""
    return load_params(path, sets=sets or ())


@effects_app.command("list")
def effects_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON records.")] = False) -> None:
    """List the catalog: id, category, stochastic or not, teacher prompt."""
    from collectionlora.effects import catalog_records

    records = catalog_records()
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    for r in records:
        kind = "stochastic" if r["stochastic"] else "deterministic"
        typer.echo(f"{r['id']:<28} {r['category']:<10} {kind:<13} {r['prompt']}")


@bank_app.command("build")
@one_line_errors
def demo_bank_build(
    out: Annotated[Path, typer.Option(help="Bank folder to (re)build.")] = Path("data"),
    max_effects: Annotated[int | None, typer.Option(help="Stop after this many effects pass (default: largest bank size).")] = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Build the demo bank deterministically: tiny base, judge, teachers, pairs, manifests. Resumable."""
    from collectionlora.demo_bank import build_demo_bank

    verdicts = build_demo_bank(params_from(params, set_), out, max_effects)
    left_out = [v.id for v in verdicts if not v.passed]
    typer.echo(f"{sum(v.passed for v in verdicts)} effects passed; left out: {', '.join(left_out) or 'none'}")


@teachers_app.command("train")
@one_line_errors
def teachers_train(
    pairs: Annotated[Path, typer.Option(help="Folder of NNNN_source.png / NNNN_result.png pairs.")],
    prompt: Annotated[str, typer.Option(help="The effect's teacher prompt.")],
    out: Annotated[Path, typer.Option(help="Output folder for the LoRA and adapter_config.json.")],
    base: Annotated[Path | None, typer.Option(help="Base pipeline folder (default: base.path).")] = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Train one effect LoRA from (source, result) pairs by flow matching (rank, steps, lr from params)."""
    from collectionlora.stages import run_teacher_train

    weights = run_teacher_train(params_from(params, set_), pairs, prompt, out, base)
    typer.echo(f"wrote {weights}")


@judge_app.command("train")
@one_line_errors
def judge_train(
    out: Annotated[Path, typer.Option(help="Folder for the judge (safetensors + JSON).")],
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Train an effect judge from the bank's own pairs (plus catalog ground truth where it exists)."""
    from collectionlora.stages import run_judge_train

    report = run_judge_train(params_from(params, set_), out)
    accuracy = report.get("holdout", {}).get("accuracy")
    typer.echo(f"judge for {len(report['effects'])} effects -> {out}" + (f"; hold-out accuracy {accuracy:.3f}" if accuracy is not None else ""))


@acceleration_app.command("train")
@one_line_errors
def acceleration_train(
    out: Annotated[Path, typer.Option(help="Output folder for pytorch_lora_weights.safetensors.")],
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Distil the bank's base into a few-step LoRA on the general stream alone (the cascade baseline's
    "Lightning" when the base has none); steps from `acceleration`, the rest from `distill`."""
    from collectionlora.stages import run_acceleration_train

    typer.echo(f"wrote {run_acceleration_train(params_from(params, set_), out)}")


@app.command("validate")
@one_line_errors
def validate(
    out: Annotated[Path, typer.Option(help="Folder for manifest.json.")] = Path("artifacts/bank"),
    dvc_file: Annotated[Path, typer.Option(help="The .dvc file tracking the bank.")] = Path("data.dvc"),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Check every file of the bank and record content hashes in manifest.json (nothing written on error)."""
    from collectionlora.stages import run_validate

    manifest = run_validate(params_from(params, set_).bank, out, dvc_file if dvc_file.exists() else None)
    typer.echo(f"bank {manifest['bank']['name']}: {len(manifest['effects'])} effects valid -> {out / 'manifest.json'}")


@app.command("rollout")
@one_line_errors
def rollout(
    out: Annotated[Path, typer.Option(help="Rollout folder: <effect>/<key>.png, index.jsonl, report.json.")] = Path("artifacts/rollouts"),
    effects: Annotated[str | None, typer.Option(help="Comma-separated effect ids (default: every effect of the bank).")] = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Sample the teachers' targets for every (effect, training source); targets already in OUT are reused."""
    from collectionlora.stages import run_rollout

    chosen = None if effects is None else [effect_id.strip() for effect_id in effects.split(",")]
    report = run_rollout(params_from(params, set_), out, chosen)
    for effect_id, counts in report["effects"].items():
        typer.echo(f"{effect_id}: {counts['computed']} computed, {counts['cached']} cached ({counts['seconds']:.1f} s)")
    totals = report["totals"]
    typer.echo(f"total: {totals['computed']} computed, {totals['cached']} cached ({totals['seconds']:.1f} s) -> {out}")


@app.command("preview")
@one_line_errors
def preview(
    out: Annotated[Path | None, typer.Option(help="Grid PNG (default: demo.out).")] = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Run each teacher on eval sources and write a grid: source | teacher | ground truth per effect."""
    from collectionlora.stages import run_preview

    loaded = params_from(params, set_)
    typer.echo(f"wrote {run_preview(loaded, out or loaded.demo.out)}")


@app.command("distill")
@one_line_errors
def distill(
    rollouts: Annotated[Path, typer.Option(help="Rollout folder (from `collectionlora rollout`).")] = Path("artifacts/rollouts"),
    out: Annotated[Path, typer.Option(help="Collection folder: the single LoRA, collection.json, checkpoints/.")] = Path("artifacts/student"),
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in OUT/checkpoints.")] = False,
    auto_resume: Annotated[
        bool,
        typer.Option(help="For `dvc repro` (OUT persists): continue OUT's interrupted run if it started from these exact params, code and inputs; else clear OUT and start afresh."),
    ] = False,
    warm_start: Annotated[Path | None, typer.Option(help="Add the bank's new effects to this existing collection.")] = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Distil every effect teacher and few-step sampling into one student LoRA (PDSR + AOP + C2F-DO).
    Multi-process: torchrun --nproc_per_node=K $(which collectionlora) distill ..."""
    from collectionlora.stages import run_distill

    loaded = params_from(params, set_)
    if auto_resume:
        if resume:
            raise ConfigError("distill: --resume and --auto-resume exclude each other")
        from collectionlora.distill.run import auto_resume as decide
        from collectionlora.runlock import claim

        with claim(out, "distill"):  # auto_resume may clear OUT: never while another run writes it
            resume = decide(loaded, rollouts, out, warm_start)
            typer.echo(f"distill: {'resuming the interrupted run' if resume else 'a fresh run'} in {out}")
            summary = run_distill(loaded, rollouts, out, resume, warm_start)
    else:
        summary = run_distill(loaded, rollouts, out, resume, warm_start)
    if "collection" in summary:  # rank 0
        typer.echo(
            f"{summary['steps']} steps ({summary['generator_updates']} generator updates) in {summary['seconds']:.0f} s -> {out}"
        )


@app.command("edit")
@one_line_errors
def edit(
    image: Annotated[Path, typer.Option(help="Input image (any size; centre-cropped and resized).")],
    out: Annotated[Path, typer.Option(help="Output PNG (missing parent folders are created; written whole or not at all).")],
    effect: Annotated[str | None, typer.Option(help="Effect id (see OUT/collection.json, or the bank manifest for other LoRAs).")] = None,
    then: Annotated[str | None, typer.Option(help="A second effect applied after the first, in the same pass (the student).")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps: few-step 8 (trained), 4, 2 or 1; the teacher sampler's default is sampling.teacher_steps.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    collection: Annotated[Path, typer.Option(help="Collection folder (for --lora student).")] = Path("artifacts/student"),
    base: Annotated[Path | None, typer.Option(help="Base pipeline folder (default: the one in collection.json, or the bank's).")] = None,
    lora: Annotated[
        str,
        typer.Option(
            help="What to apply: 'student' (the collection), 'teacher' (the effect's teacher), 'acceleration' (the bank's "
            "few-step LoRA), or any LoRA .safetensors file or its folder (a baseline, a teacher you trained)."
        ),
    ] = "student",
    prompt: Annotated[str | None, typer.Option(help="The instruction (default: the effect's student prompt, or its teacher prompt for other LoRAs).")] = None,
    sampler: Annotated[
        str | None, typer.Option(help="'teacher' (many steps with CFG, per params sampling) or 'few-step' (default: few-step for the student, the acceleration LoRA and --accelerate).")
    ] = None,
    accelerate: Annotated[bool, typer.Option(help="Stack the bank's acceleration LoRA on --lora (as the cascade and baselines are evaluated).")] = False,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Apply an effect of the collection with the single student LoRA (no routing, no LoRA switching), or
    try any other LoRA on the bank's base: `--lora teacher --effect ID` samples that teacher as it is
    meant to be (teacher prompt, sampling.teacher_steps with CFG); add `--accelerate` for the cascade."""
    from collectionlora.edit import run_edit

    loaded = params_from(params, set_)
    typer.echo(f"wrote {run_edit(loaded, collection, effect, image, out, steps, then, seed, base, lora, prompt, sampler, accelerate)}")


@app.command("baselines")
@one_line_errors
def baselines(
    rollouts: Annotated[Path, typer.Option(help="Rollout folder (from `collectionlora rollout`).")] = Path("artifacts/rollouts"),
    student: Annotated[
        Path, typer.Option(help="A distill output: its prompts.json (the student prompts) and, with fm_all_in_one.source anchor, its anchor/.")
    ] = Path("artifacts/student"),
    out: Annotated[Path, typer.Option(help="Folder for the baseline LoRAs and baselines.json.")] = Path("artifacts/baselines"),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Build the alternatives the student is compared with: FM all-in-1 and the PEFT merges of the teachers."""
    from collectionlora.stages import run_baselines

    report = run_baselines(params_from(params, set_), rollouts, student, out)
    fm = report["fm_all_in_one"]
    origin = f"the anchored student ({fm['steps']} TA-FM steps)" if fm["source"] == "anchor" else f"{fm['steps']} steps in {fm['seconds']:.0f} s"
    typer.echo(f"FM all-in-1: {origin}; merges: {', '.join(report['merges'])} -> {out}")


@app.command("evaluate")
@one_line_errors
def evaluate(
    collection: Annotated[Path, typer.Option(help="Collection folder (from `collectionlora distill`).")] = Path("artifacts/student"),
    baselines: Annotated[Path, typer.Option(help="Baselines folder (from `collectionlora baselines`).")] = Path("artifacts/baselines"),
    out: Annotated[Path, typer.Option(help="Folder for metrics.json, methods.md, gate.json, ...")] = Path("artifacts/eval"),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Score the teachers, the cascade, FM all-in-1, the merges and the student on the bank's eval
    sources; write the tables, plots and the promotion gate, and print the methods table."""
    from collectionlora.evaluate.report import TABLE
    from collectionlora.stages import run_evaluate

    summary = run_evaluate(params_from(params, set_), collection, baselines, out, params)
    typer.echo((Path(out) / TABLE).read_text(encoding="utf-8"))
    typer.echo(f"evaluated in {summary['seconds']:.0f} s; gate {'passed' if summary['gate']['passed'] else 'FAILED'} -> {out}")


@app.command("register")
@one_line_errors
def register(
    collection: Annotated[Path, typer.Option(help="Collection folder (from `collectionlora distill`).")] = Path("artifacts/student"),
    evaluation: Annotated[Path, typer.Option(help="Its evaluation folder (from `collectionlora evaluate`).")] = Path("artifacts/eval"),
    manifest: Annotated[Path, typer.Option(help="The bank manifest (from `collectionlora validate`).")] = Path("artifacts/bank/manifest.json"),
    out: Annotated[Path, typer.Option(help="Folder for registration.json.")] = Path("artifacts/registry"),
    require_pass: Annotated[bool, typer.Option(help="Refuse (exit 1, nothing registered) when the gate failed (CI, Kubeflow).")] = False,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Register the evaluated student in MLflow as a pyfunc model version: alias `challenger`, and
    `champion` only if its gate passed and it beats the current champion. A failed gate is a result (exit 0)."""
    from collectionlora.stages import run_register

    result = run_register(params_from(params, set_), collection, evaluation, manifest, out, require_pass)
    verb = "registered" if result["registered"] else "already registered as"
    aliases = ", ".join(result["aliases"]) or "no aliases"
    typer.echo(f"{verb} {result['name']} version {result['version']} ({aliases}) in {result['tracking_uri']}")
    typer.echo(result["reason"])


@app.command("promote")
@one_line_errors
def promote(
    name: Annotated[str, typer.Option(help="Registered model name.")],
    version: Annotated[str, typer.Option(help="Model version to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to set.")] = "champion",
    force: Annotated[bool, typer.Option(help="Skip the champion rule (gate passed and beats the current champion).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (required with --force; recorded as a version tag with $USER).")] = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Set an alias on a registered version; `champion` follows the registry's rule unless --force --reason."""
    from collectionlora.registry.register import promote as promote_version

    typer.echo(promote_version(params_from(params, set_), name, version, alias, force, reason))


@registry_app.command("show")
@one_line_errors
def registry_show(
    name: Annotated[str | None, typer.Option(help="Registered model name (default: registry.model_name).")] = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """List a registered model's versions with their aliases and gate results, newest first."""
    from collectionlora.registry.register import describe_model

    loaded = params_from(params, set_)
    chosen = name or loaded.registry.model_name
    typer.echo(f"{chosen}:")
    for v in describe_model(loaded, chosen):
        aliases = f" @{', @'.join(v['aliases'])}" if v["aliases"] else ""
        gate = "passed" if v["gate_passed"] == "true" else "failed"
        typer.echo(f"  version {v['version']}{aliases}: gate {gate}, judge accuracy {v['judge_accuracy']}, BCR {v['bcr']}, lora {v['lora_sha256']}, git {v['git_commit']}")


ExperimentOut = Annotated[Path | None, typer.Option(help="Experiment folder (default: artifacts/experiments/<name>).")]
LargerBank = Annotated[Path, typer.Option(help="The larger bank whose effects are added.")]


def _experiment_out(out: Path | None, name: str) -> Path:
    return out or Path("artifacts/experiments") / name


@experiment_app.command("ablations")
@one_line_errors
def experiment_ablations(
    rollouts: Annotated[Path, typer.Option(help="Rollout folder of the bank.")] = Path("artifacts/rollouts"),
    full: Annotated[Path | None, typer.Option(help="Reuse this collection as the full method (e.g. artifacts/student).")] = None,
    variants: Annotated[str | None, typer.Option(help="Comma-separated subset: full,no_pdsr,no_aop,no_ts,no_ta_fm.")] = None,
    out: ExperimentOut = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Table 3: the full method against PDSR, AOP, TS and TA-FM each switched off (same budget)."""
    from collectionlora.experiments import run_ablations

    chosen = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    run_ablations(params_from(params, set_), rollouts, _experiment_out(out, "ablations"), full, chosen)
    typer.echo((_experiment_out(out, "ablations") / "ablations.md").read_text(encoding="utf-8"))


@experiment_app.command("scaling")
@one_line_errors
def experiment_scaling(
    sizes: Annotated[str, typer.Option(help="Comma-separated collection sizes.")] = "10,20,50",
    manifest: LargerBank = Path("data/bank-50.yaml"),
    rollouts: Annotated[Path, typer.Option(help="Rollout folder for the larger bank.")] = Path("artifacts/experiments/rollouts"),
    out: ExperimentOut = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Table 4: collections of the first N effects against the teachers, the cascade and FM all-in-1."""
    from collectionlora.experiments import run_scaling

    counts = [int(part) for part in sizes.split(",") if part.strip()]
    run_scaling(params_from(params, set_), manifest, rollouts, _experiment_out(out, "scaling"), counts)
    typer.echo((_experiment_out(out, "scaling") / "scaling.md").read_text(encoding="utf-8"))


@experiment_app.command("composition")
@one_line_errors
def experiment_composition(
    collection: Annotated[Path, typer.Option(help="Collection folder.")] = Path("artifacts/student"),
    max_pairs: Annotated[int | None, typer.Option(help="Only the first N ordered effect pairs.")] = None,
    out: ExperimentOut = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Zero-shot composition A then B: one 8-NFE pass with the composition prompt vs two chained passes."""
    from collectionlora.experiments import run_composition

    run_composition(params_from(params, set_), collection, _experiment_out(out, "composition"), max_pairs)
    typer.echo((_experiment_out(out, "composition") / "composition.md").read_text(encoding="utf-8"))


@experiment_app.command("incremental")
@one_line_errors
def experiment_incremental(
    collection: Annotated[Path, typer.Option(help="The collection to grow.")] = Path("artifacts/student"),
    added: Annotated[int, typer.Option(help="Effects to add, one run each.")] = 2,
    manifest: LargerBank = Path("data/bank-50.yaml"),
    rollouts: Annotated[Path, typer.Option(help="Rollout folder for the larger bank.")] = Path("artifacts/experiments/rollouts"),
    out: ExperimentOut = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Table 5: add the larger bank's next effects one at a time; old effects' fidelity before and after."""
    from collectionlora.experiments import run_incremental

    run_incremental(params_from(params, set_), collection, manifest, rollouts, _experiment_out(out, "incremental"), added)
    typer.echo((_experiment_out(out, "incremental") / "incremental.md").read_text(encoding="utf-8"))


@app.command("ui")
@one_line_errors
def ui(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Serve the MLflow UI of the tracking store on 127.0.0.1 ($COLLECTIONLORA_UI_PORT, default 5000) until Ctrl-C."""
    from collectionlora.registry.server import MlflowServer
    from collectionlora.tracking import tracking_uri

    server = MlflowServer.for_tracking_uri(tracking_uri(params_from(params, set_).tracking))
    typer.echo(f"starting mlflow server on {server.store.backend_store_uri} (log: {server.store.log_file}) ...")
    with server:
        typer.echo(f"MLflow UI: {server.url}  (Ctrl-C stops it)")
        try:
            code = server.wait()
        except KeyboardInterrupt:
            typer.echo("stopping the MLflow UI")
            return
    if code:
        raise CollectionLoraError(f"mlflow server exited with status {code}: {server.log_tail()}")


RepoOption = Annotated[Path, typer.Option(help="Repository root (pipelines/, components/, data.dvc).")]


@pipeline_app.command("compile")
@one_line_errors
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="IR YAML to write.")] = Path("artifacts/pipeline/collectionlora.yaml"),
    repo: RepoOption = Path("."),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Compile the pipeline to IR YAML, params.yaml's values as its defaults (image: $COLLECTIONLORA_IMAGE or kfp.image)."""
    from collectionlora.pipeline.build import compile_pipeline

    typer.echo(f"wrote {compile_pipeline(params_from(params, set_), out, repo)}")


KfpHostOption = Annotated[
    str, typer.Option("--host", help="The KFP API URL, http(s)://...; token from $KFP_TOKEN or the file named by $KF_PIPELINES_SA_TOKEN_PATH (none needed on loopback).")
]
IrOption = Annotated[Path | None, typer.Option("--ir", help="A compiled IR YAML (default: compile params.yaml with --set into a temporary file).")]


@pipeline_app.command("upload")
@one_line_errors
def pipeline_upload(
    host: KfpHostOption,
    name: Annotated[str | None, typer.Option(help="Pipeline name (default: kfp.pipeline_name).")] = None,
    version: Annotated[str | None, typer.Option(help="Version name when the pipeline exists (default: <UTC time>-<IR sha256[:12]>).")] = None,
    ir: IrOption = None,
    description: Annotated[str, typer.Option(help="Description shown in the KFP UI.")] = "",
    repo: RepoOption = Path("."),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Upload the compiled pipeline to a KFP cluster: a new pipeline, or a new version of an existing one."""
    import tempfile

    from collectionlora.pipeline.client import api_host, connect, kfp_token, pipeline_ir, upload

    loaded = params_from(params, set_)
    kfp_token(api_host(host))  # a missing token is one line before compiling
    with tempfile.TemporaryDirectory() as scratch:
        chosen = pipeline_ir(ir, loaded, repo, Path(scratch))
        result = upload(connect(host), chosen, name or loaded.kfp.pipeline_name, version, description)
    typer.echo(f"uploaded {result['created']}: {name or loaded.kfp.pipeline_name} version {result['version']} "
               f"(pipeline {result['pipeline_id']}, version {result['pipeline_version_id']}): {result['url']}")
    if result["note"]:
        typer.echo(f"note: {result['note']}")


@pipeline_app.command("run")
@one_line_errors
def pipeline_run(
    host: KfpHostOption,
    experiment: Annotated[str | None, typer.Option(help="KFP experiment, created if missing (default: kfp.pipeline_name).")] = None,
    param: Annotated[list[str], typer.Option("--param", "-p", help="A pipeline parameter for this run: name=value (text as given).")] = None,
    ir: IrOption = None,
    run_name: Annotated[str | None, typer.Option(help="Run name (default: <pipeline> <UTC time>).")] = None,
    repo: RepoOption = Path("."),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Start a run of the compiled pipeline on a KFP cluster; --set changes the compiled defaults, --param this run's values."""
    import tempfile

    from collectionlora.pipeline.client import api_host, check_arguments, connect, ir_spec, kfp_token, pipeline_ir, run

    arguments = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected name=value")
        arguments[key] = value
    loaded = params_from(params, set_)
    kfp_token(api_host(host))  # a missing token is one line before compiling
    with tempfile.TemporaryDirectory() as scratch:
        chosen = pipeline_ir(ir, loaded, repo, Path(scratch))
        check_arguments(ir_spec(chosen), arguments)  # refused before any request
        kfp = loaded.kfp
        result = run(connect(host), chosen, experiment or kfp.pipeline_name, arguments, run_name, kfp.namespace, kfp.service_account)
    typer.echo(f"started run {result['run_name']!r} ({result['run_id']}) in experiment {result['experiment']}: {result['url']}")


@pipeline_app.command("run-local")
@one_line_errors
def pipeline_run_local(
    work: Annotated[Path, typer.Option(help="Folder for the run's pipeline_root/ and checkpoints/.")] = Path("artifacts/kfp-local"),
    repo: RepoOption = Path("."),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Run the whole pipeline here with kfp.local (each task a process of this environment), registering
    into the tracking store; pass a small budget with --set for a quick run."""
    from collectionlora.pipeline.local_run import run_local

    loaded = params_from(params, set_)
    result = run_local(loaded, work, repo)
    typer.echo(f"pipeline finished in {result['seconds']:.0f} s; outputs in {result['pipeline_root']}")
    registry_show(None, params, set_)


def main() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="collectionlora")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
