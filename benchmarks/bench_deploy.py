"""Deployment benchmark (the paper's Table 2 analogue) on the embedded demo bank: ratios measured in one run.

A seeded stream of R requests, each asking for one random effect of the bank on one eval source, is
served three ways on one resident base, with stock diffusers adapter calls only:
(a) conventional bank: per request `pipe.load_lora_weights` the effect's teacher, `set_adapters`, the
    teacher sampler (params.sampling: 40 Euler steps x CFG = 80 NFE), `unload_lora_weights`: the server
    keeps only the base resident;
(b) teacher + acceleration LoRA: the acceleration LoRA stays loaded; per request the effect's teacher
    is loaded, both adapters are active (`set_adapters([effect, "acceleration"], [1, 1])`), the 8-step
    student sampler runs with the teacher prompt, and the effect adapter is deleted;
(c) the student: loaded once before the stream, nothing to switch, 8 steps with the student prompt.

Measured per method: adapter loads and switches over the stream, NFE per request, mean and p95
latency per request (adapter calls + prompt encoding + sampling + decoding; one untimed warm-up
request first) and the part of it spent inside adapter calls, and storage bytes (N teacher files
[+ the acceleration file] against 1 student file).
Ratios: latency (a)/(c) and (b)/(c), storage N teachers / 1 student.

Needs the demo bank (`dvc pull data.dvc`), a trained collection and the bank's acceleration LoRA
(`acceleration:` in bank.yaml, or --acceleration). Usage:
    python benchmarks/bench_deploy.py [--requests 48] [--collection artifacts/student]
        [--acceleration PATH] [--threads N] [--out artifacts/benchmarks/deploy.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch

from collectionlora.bank import Bank, Effect, load_bank
from collectionlora.config import Params, load_params
from collectionlora.distill.export import LORA_WEIGHTS, read_collection
from collectionlora.distill.prompting import PromptPlan
from collectionlora.errors import CollectionLoraError
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import (
    Samples,
    sample_student,
    sample_teacher,
    student_timesteps,
)

REPO = Path(__file__).resolve().parents[1]
ACCELERATION = "acceleration"
STUDENT = "student"

# peft warns on every second adapter injected into the same model; (b) does that by design.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


@dataclass(frozen=True)
class Request:
    effect: Effect
    source: int  # index into the bank's eval sources
    seed: int  # noise seed of the request's sample


def request_stream(bank: Bank, count: int, seed: int) -> list[Request]:
    """The same stream for every method and every run with the same seed."""
    rng = random.Random(seed)
    return [Request(rng.choice(bank.effects), rng.randrange(len(bank.eval_sources)), i) for i in range(count)]


class Server:
    """One way of serving the stream on the shared pipeline; counts the adapter calls it makes."""

    name = ""

    def __init__(self, backbone: Backbone, params: Params):
        self.backbone = backbone
        self.pipe = backbone.pipe
        self.sampling = params.sampling
        self.loads = 0
        self.switches = 0
        self.adapter_s = 0.0  # wall time inside the diffusers adapter calls

    def load(self, path: Path, adapter: str) -> None:
        started = time.perf_counter()
        self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        self.adapter_s += time.perf_counter() - started
        self.loads += 1

    def switch(self, adapters: list[str], weights: list[float]) -> None:
        started = time.perf_counter()
        self.pipe.set_adapters(adapters, weights)
        self.adapter_s += time.perf_counter() - started
        self.switches += 1

    def release(self, adapter: str | None) -> None:
        """Delete one adapter, or with None unload every LoRA (the base alone stays)."""
        started = time.perf_counter()
        if adapter is None:
            self.pipe.unload_lora_weights()
        else:
            self.pipe.delete_adapters(adapter)
        self.adapter_s += time.perf_counter() - started

    def start(self) -> None:
        """Whatever stays resident for the whole stream."""

    def serve(self, request: Request, source: torch.Tensor) -> Samples:
        raise NotImplementedError

    def stop(self) -> None:
        self.release(None)


class ConventionalBank(Server):
    name = "a_conventional_bank"

    def serve(self, request: Request, source: torch.Tensor) -> Samples:
        self.load(request.effect.teacher, request.effect.id)
        self.switch([request.effect.id], [1.0])
        samples = sample_teacher(self.backbone, source, [request.effect.prompt], [request.seed], self.sampling)
        self.release(None)
        return samples


class AcceleratedTeacher(Server):
    name = "b_teacher_plus_acceleration"

    def __init__(self, backbone: Backbone, params: Params, acceleration: Path):
        super().__init__(backbone, params)
        self.acceleration = acceleration
        self.timesteps = student_timesteps(params.sampling)

    def start(self) -> None:
        self.load(self.acceleration, ACCELERATION)

    def serve(self, request: Request, source: torch.Tensor) -> Samples:
        self.load(request.effect.teacher, request.effect.id)
        self.switch([request.effect.id, ACCELERATION], [1.0, 1.0])
        samples = sample_student(self.backbone, source, [request.effect.prompt], [request.seed], self.timesteps)
        self.release(request.effect.id)  # leaves the acceleration adapter active
        return samples


class StudentServer(Server):
    name = "c_student"

    def __init__(self, backbone: Backbone, params: Params, collection: Path, record: dict):
        super().__init__(backbone, params)
        self.weights = collection / LORA_WEIGHTS
        self.plan = PromptPlan.from_json(record["prompts"])
        self.timesteps = [float(t) for t in record["timesteps"]]

    def start(self) -> None:
        self.load(self.weights, STUDENT)
        self.switch([STUDENT], [1.0])

    def serve(self, request: Request, source: torch.Tensor) -> Samples:
        prompt = self.plan.student(request.effect.id)
        return sample_student(self.backbone, source, [prompt], [request.seed], self.timesteps)


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (defined for any non-empty list)."""
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def run_stream(server: Server, stream: list[Request], sources: torch.Tensor) -> dict:
    """Serve the stream after one untimed warm-up; counters cover the timed stream only."""
    server.start()
    resident_loads = server.loads
    server.serve(stream[0], sources[stream[0].source][None])
    server.loads = server.switches = 0
    server.adapter_s = 0.0
    latencies, nfe = [], set()
    for request in stream:
        # A server encodes every request's prompt; the training-time prompt cache would hide that cost
        # (and let (b) reuse (a)'s teacher-prompt encodings).
        server.backbone.clear_prompt_cache()
        started = time.perf_counter()
        samples = server.serve(request, sources[request.source][None])
        latencies.append(time.perf_counter() - started)
        nfe.add(samples.nfe)
    adapter_s = server.adapter_s
    server.stop()
    return {
        "loads_before_stream": resident_loads,
        "adapter_loads": server.loads,
        "adapter_switches": server.switches,
        "nfe_per_request": max(nfe),
        "latency_mean_s": statistics.fmean(latencies),
        "latency_p95_s": p95(latencies),
        "adapter_calls_mean_s": adapter_s / len(stream),
    }


def collection_plan(collection: Path, bank: Bank) -> dict:
    """The collection's record, refusing one that lacks its weights or an effect of the bank."""
    if not (collection / LORA_WEIGHTS).is_file():
        raise CollectionLoraError(f"{collection / LORA_WEIGHTS}: no student LoRA (train one with `collectionlora distill` or pass --collection)")
    record = read_collection(collection)
    known = {row.effect for row in PromptPlan.from_json(record["prompts"]).effects}
    missing = [e.id for e in bank.effects if e.id not in known]
    if missing:
        raise CollectionLoraError(f"{collection / 'collection.json'}: prompts.effects: no student prompt for {', '.join(missing)}")
    return record


def acceleration_file(bank: Bank, override: Path | None) -> Path:
    path = override or bank.acceleration
    if path is None:
        raise CollectionLoraError(f"{bank.manifest}: acceleration: the bank lists no acceleration LoRA (add `acceleration:` or pass --acceleration PATH)")
    if not Path(path).is_file():
        raise CollectionLoraError(f"{path}: acceleration LoRA file not found (train one with `collectionlora acceleration train`)")
    return Path(path)


def run_benchmark(params: Params, collection: Path, acceleration: Path | None, requests: int, seed: int) -> dict:
    """All three methods over the same seeded stream on one resident base."""
    bank = load_bank(REPO / params.bank.manifest, params.bank.image_size, params.bank.max_effects)
    record = collection_plan(collection, bank)
    acceleration = acceleration_file(bank, acceleration)
    backbone = Backbone.load(params.base, bank.base_dir)
    sources = bank.load_eval_sources()
    stream = request_stream(bank, requests, seed)
    servers = [
        ConventionalBank(backbone, params),
        AcceleratedTeacher(backbone, params, acceleration),
        StudentServer(backbone, params, collection, record),
    ]
    methods = {server.name: run_stream(server, stream, sources) for server in servers}

    teacher_bytes = sum(effect.teacher.stat().st_size for effect in bank.effects)
    student_bytes = (collection / LORA_WEIGHTS).stat().st_size
    methods["a_conventional_bank"]["storage_bytes"] = teacher_bytes
    methods["b_teacher_plus_acceleration"]["storage_bytes"] = teacher_bytes + acceleration.stat().st_size
    methods["c_student"]["storage_bytes"] = student_bytes
    a, b, c = (methods[server.name] for server in servers)
    return {
        "bank": str(bank.manifest.relative_to(REPO) if bank.manifest.is_relative_to(REPO) else bank.manifest),
        "effects": len(bank.effects),
        "requests": requests,
        "seed": seed,
        "threads": params.base.threads,
        "effects_requested": len({r.effect.id for r in stream}),
        "methods": methods,
        "latency_a_over_c": a["latency_mean_s"] / c["latency_mean_s"],
        "latency_b_over_c": b["latency_mean_s"] / c["latency_mean_s"],
        "latency_p95_a_over_c": a["latency_p95_s"] / c["latency_p95_s"],
        "latency_p95_b_over_c": b["latency_p95_s"] / c["latency_p95_s"],
        "storage_teachers_over_student": teacher_bytes / student_bytes,
        "storage_teachers_plus_acceleration_over_student": b["storage_bytes"] / student_bytes,
    }


def print_table(results: dict) -> None:
    print(f"{results['requests']} requests over {results['effects_requested']} of {results['effects']} effects, {results['threads']} threads")
    print(f"{'method':<30}{'loads':>7}{'switches':>10}{'NFE':>6}{'mean s':>10}{'p95 s':>10}{'adapter s':>11}{'storage MB':>12}")
    for name, row in results["methods"].items():
        print(
            f"{name:<30}{row['adapter_loads']:>7}{row['adapter_switches']:>10}{row['nfe_per_request']:>6}"
            f"{row['latency_mean_s']:>10.4f}{row['latency_p95_s']:>10.4f}{row['adapter_calls_mean_s']:>11.4f}"
            f"{row['storage_bytes'] / 1e6:>12.3f}"
        )
    for key, value in results.items():
        if "_over_" in key:
            print(f"{key:<48} {value:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--collection", type=Path, default=REPO / "artifacts" / "student")
    parser.add_argument("--acceleration", type=Path, default=None, help="acceleration LoRA file (default: the bank's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request stream")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: params.yaml base.threads)")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "benchmarks" / "deploy.json")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    try:
        params = load_params(REPO / "params.yaml", {"base": {"threads": args.threads}} if args.threads else None)
        results = run_benchmark(params, args.collection, args.acceleration, args.requests, args.seed)
    except CollectionLoraError as error:
        sys.exit(f"bench_deploy: {' '.join(str(error).split())}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


if __name__ == "__main__":
    main()
