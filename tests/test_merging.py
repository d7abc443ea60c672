"""PEFT merges of teacher LoRAs (the evaluation baseline): each method reproduces peft's
`add_weighted_adapter` or `merge_utils` on the same deltas, DARE is seeded, and a merged file loads
through `read_lora` and `AdapterSet` and acts on the transformer as base + merged delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bankfactory import module_lora, probe_velocity
from peft import get_peft_model
from peft.utils import merge_utils

from collectionlora.adapters import NONE, AdapterSet
from collectionlora.lorafile import (
    LoraWeights,
    base_linear_shapes,
    peft_config_for,
    read_lora,
    write_lora,
)
from collectionlora.merging import (
    MERGED_WEIGHT_NAME,
    MergeError,
    merge_loras,
    write_merges,
)
from collectionlora.models.backbone import Backbone

# module -> (out, in) of a small stand-in base
SHAPES = {"blocks.0.to_q": (6, 8), "blocks.0.to_v": (5, 8), "blocks.1.to_q": (6, 8)}
MIXED = {
    # name -> (module -> rank, alpha): mixed ranks and alphas, modules missing from some teachers
    "a": ({"blocks.0.to_q": 4, "blocks.0.to_v": 4, "blocks.1.to_q": 4}, 8.0),
    "b": ({"blocks.0.to_q": 2, "blocks.1.to_q": 3}, None),
    "c": ({"blocks.0.to_q": 3, "blocks.0.to_v": 2}, 3.0),
}
EQUAL = {  # equal ranks for peft's `linear`
    "a": ({"blocks.0.to_q": 4, "blocks.0.to_v": 4, "blocks.1.to_q": 4}, 8.0),
    "b": ({"blocks.0.to_q": 4, "blocks.1.to_q": 4}, 2.0),
}
WEIGHTS = [1.0, -0.5, 0.8]
SETTINGS = {"rank": 3, "density": 0.5, "majority_sign_method": "total", "seed": 0}


def write_teachers(folder: Path, teachers: dict, shapes: dict[str, tuple[int, int]]) -> list[Path]:
    paths = []
    for i, (name, (modules, alpha)) in enumerate(teachers.items()):
        paths.append(folder / f"{name}.safetensors")
        write_lora(module_lora(shapes, modules, alpha, seed=10 + i), paths[-1], "diffusers")
    return paths


def deltas(lora: LoraWeights) -> dict[str, torch.Tensor]:
    return {name: (up.float() @ down.float()) * lora.modules[name].scale for name, down, up in lora.pairs()}


def weighted_delta_sum(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, weight in zip(paths, weights):
        for name, delta in deltas(read_lora(path, SHAPES)).items():
            total[name] = total.get(name, torch.zeros_like(delta)) + weight * delta
    return total


def merge(paths: list[Path], method: str, weights: list[float] | None = WEIGHTS, **settings) -> LoraWeights:
    return merge_loras(paths, method, weights, **{**SETTINGS, **settings}, base_shapes=SHAPES)


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        assert torch.allclose(got[name], expected, atol=atol), (name, (got[name] - expected).abs().max())


# ---- peft itself, on a small stand-in model ----------------------------------------------------
class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            [
                torch.nn.ModuleDict({"to_q": torch.nn.Linear(8, 6), "to_v": torch.nn.Linear(8, 5)}),
                torch.nn.ModuleDict({"to_q": torch.nn.Linear(8, 6)}),
            ]
        )


def peft_merge(paths: list[Path], combination_type: str, weights: list[float], **kwargs) -> dict[str, torch.nn.Module]:
    """The teachers as peft adapters on TwoBlocks, merged by peft's `add_weighted_adapter`."""
    model = None
    names = [f"t{i}" for i in range(len(paths))]  # peft warns about names that are substrings of "lora_"
    for name, path in zip(names, paths):
        lora = read_lora(path, SHAPES)
        if model is None:
            model = get_peft_model(TwoBlocks(), peft_config_for(lora), adapter_name=name)
        else:
            model.add_adapter(name, peft_config_for(lora))
        with torch.no_grad():
            for module, down, up in lora.pairs():
                layer = model.base_model.model.get_submodule(module)
                layer.lora_A[name].weight.copy_(down)
                layer.lora_B[name].weight.copy_(up)
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    return {module: model.base_model.model.get_submodule(module) for module in SHAPES}


def test_cat_is_the_exact_sum_of_scaled_deltas_and_loads_back(tmp_path):
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    merged = merge(paths, "cat")
    assert merged.ranks() == {"blocks.0.to_q": 4 + 2 + 3, "blocks.0.to_v": 4 + 2, "blocks.1.to_q": 4 + 3}
    assert all(module.scale == 1.0 for module in merged.modules.values())
    assert_close(deltas(merged), weighted_delta_sum(paths, WEIGHTS))
    write_lora(merged, tmp_path / "out" / MERGED_WEIGHT_NAME, "diffusers")
    again = read_lora(tmp_path / "out" / MERGED_WEIGHT_NAME, SHAPES)
    assert again.ranks() == merged.ranks()
    assert_close(deltas(again), deltas(merged), atol=0)


def test_linear_equals_peft_rule_on_a_and_b(tmp_path):
    paths = write_teachers(tmp_path, EQUAL, SHAPES)
    weights = [0.7, -0.4]
    merged = merge(paths, "linear", weights)
    reference = peft_merge(paths, "linear", weights)
    for name, down, up in merged.pairs():
        assert merged.modules[name].scale == 1.0 == reference[name].scaling["merged"]
        assert torch.allclose(down, reference[name].lora_A["merged"].weight, atol=1e-6), name
        assert torch.allclose(up, reference[name].lora_B["merged"].weight, atol=1e-6), name
    # By hand for the module both teachers hold: A mixes sign*sqrt(|w s|) A_i, B mixes sqrt(|w s|) B_i.
    a, b = read_lora(paths[0], SHAPES), read_lora(paths[1], SHAPES)
    name = "blocks.0.to_q"
    wa, wb = 0.7 * a.modules[name].scale, -0.4 * b.modules[name].scale
    (_, a_down, a_up), (_, b_down, b_up) = [next(p for p in lora.pairs() if p[0] == name) for lora in (a, b)]
    down, up = next((d, u) for n, d, u in merged.pairs() if n == name)
    assert torch.allclose(down, wa**0.5 * a_down - abs(wb) ** 0.5 * b_down, atol=1e-6)
    assert torch.allclose(up, wa**0.5 * a_up + abs(wb) ** 0.5 * b_up, atol=1e-6)


@pytest.mark.parametrize(("method", "peft_type"), [("cat", "cat"), ("svd", "svd"), ("ties", "ties_svd")])
def test_mixed_rank_merges_equal_peft_add_weighted_adapter(tmp_path, method, peft_type):
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    merged = merge(paths, method)
    reference = peft_merge(paths, peft_type, WEIGHTS, svd_rank=SETTINGS["rank"], density=SETTINGS["density"])
    assert_close(deltas(merged), {name: layer.get_delta_weight("merged") for name, layer in reference.items()})


def test_svd_full_rank_is_the_weighted_sum_and_lower_rank_the_best_approximation(tmp_path):
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    total = weighted_delta_sum(paths, WEIGHTS)
    assert_close(deltas(merge(paths, "svd", rank=8)), total)
    assert merge(paths, "svd", rank=8).ranks() == {"blocks.0.to_q": 6, "blocks.0.to_v": 5, "blocks.1.to_q": 6}
    low = merge(paths, "svd", rank=2)
    assert set(low.ranks().values()) == {2}
    for name, delta in deltas(low).items():
        u, s, vh = torch.linalg.svd(total[name])
        assert torch.allclose(delta, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-5), name
        # Eckart-Young: the error is exactly the dropped singular values
        assert torch.isclose(torch.linalg.matrix_norm(total[name] - delta), s[2:].norm(), atol=1e-5)


def peft_utils_then_svd(paths: list[Path], method: str, rank: int, density: float, seed: int) -> dict[str, torch.Tensor]:
    """peft's merge_utils on the teachers' deltas, module by module in name order under `seed`, then
    the best rank-`rank` approximation."""
    teachers = [deltas(read_lora(path, SHAPES)) for path in paths]
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in sorted(SHAPES):
            held = [(weight, d[name]) for weight, d in zip(WEIGHTS, teachers) if name in d]
            function = merge_utils.ties if method == "ties" else merge_utils.dare_ties
            combined = function([d for _, d in held], torch.tensor([w for w, _ in held]), density, "total")
            u, s, vh = torch.linalg.svd(combined, full_matrices=False)
            out[name] = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return out


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_and_dare_ties_equal_peft_merge_utils_then_svd(tmp_path, method):
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    for rank in (3, 8):
        merged = merge(paths, method, rank=rank, density=0.4, seed=5)
        assert_close(deltas(merged), peft_utils_then_svd(paths, method, rank, 0.4, seed=5))


def test_dare_is_deterministic_per_seed_and_changes_with_it(tmp_path):
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    first, again, other = (deltas(merge(paths, "dare_ties", seed=seed)) for seed in (1, 1, 2))
    assert_close(again, first, atol=0)
    assert any(not torch.allclose(first[name], other[name]) for name in first)


def test_a_missing_module_counts_as_a_zero_delta(tmp_path):
    """b lacks blocks.0.to_v; a b with a zero B there must merge identically (TIES: no vote, no share)."""
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    b = read_lora(paths[1], SHAPES)
    modules = {name: (down, up, b.modules[name].alpha) for name, down, up in b.pairs()}
    modules["blocks.0.to_v"] = (torch.randn(2, 8), torch.zeros(5, 2), None)
    write_lora(LoraWeights.from_tensors(modules), tmp_path / "b0.safetensors", "diffusers")
    with_zero = [paths[0], tmp_path / "b0.safetensors", paths[2]]
    for method in ("cat", "svd", "ties"):
        assert_close(deltas(merge(with_zero, method)), deltas(merge(paths, method)))


def test_write_merges_writes_one_file_per_method(tmp_path):
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    written = write_merges(
        paths, tmp_path / "merged", ["cat", "svd", "ties", "dare_ties"], WEIGHTS,
        **SETTINGS, base_shapes=SHAPES, layout="diffusers",
    )
    for method, path in written.items():
        assert path == tmp_path / "merged" / method / MERGED_WEIGHT_NAME
        assert_close(deltas(read_lora(path, SHAPES)), deltas(merge(paths, method)))


@pytest.mark.parametrize(
    ("method", "weights", "settings", "message"),
    [
        ("average", None, {}, r"method: unknown merge method 'average'; choose from linear, ties"),
        ("svd", [1.0, 2.0], {}, r"weights: 2 values for 3 LoRA files \(.*a\.safetensors, .*b\.safetensors, .*c\.safetensors\)"),
        ("svd", [1.0, float("nan"), 1.0], {}, r"weights\[1\] \(.*b\.safetensors\): must be a finite number"),
        ("linear", None, {}, r"linear merge: module blocks\.0\.to_q: needs equal ranks, got .*a\.safetensors r=4, .*b\.safetensors r=2"),
        ("svd", [3e38, 3e38, 3e38], {}, r"svd merge: module blocks\.0\.to_q: result is not finite \(NaN or inf\); check weights"),
        ("ties", None, {"density": 0.0}, r"density: the ties merge keeps this share of each delta, in \(0, 1\]"),
        ("dare_ties", None, {"majority_sign_method": "mean"}, r"majority_sign_method: unknown 'mean'"),
        ("svd", None, {"rank": 0}, r"rank: the svd merge needs a target rank >= 1"),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, method, weights, settings, message):
    paths = write_teachers(tmp_path, MIXED, SHAPES)
    with pytest.raises(MergeError, match=message) as error:
        merge(paths, method, weights, **settings)
    assert "\n" not in str(error.value)


# ---- on the tiny backbone -----------------------------------------------------------------------
BACKBONE_TEACHERS = {
    "a": ({"transformer_blocks.0.attn.to_q": 4, "transformer_blocks.1.attn.to_v": 4}, None),
    "b": ({"transformer_blocks.0.attn.to_q": 2, "transformer_blocks.1.attn.add_k_proj": 6}, 3.0),
}


def test_merged_adapter_runs_as_base_plus_merged_delta(backbone, tiny_params, tiny_base_dir, tmp_path):
    shapes = base_linear_shapes(backbone.transformer)
    paths = write_teachers(tmp_path, BACKBONE_TEACHERS, shapes)
    written = write_merges(
        paths, tmp_path / "merged", ["svd", "cat"], [1.0, 0.5],
        rank=10, density=1.0, majority_sign_method="total", seed=0, base_shapes=shapes, layout="diffusers",
    )
    cat_of_a = merge_loras([paths[0]], "cat", None, **SETTINGS, base_shapes=shapes)
    write_lora(cat_of_a, tmp_path / "cat_of_a.safetensors", "diffusers")

    adapters = AdapterSet(backbone.transformer)
    base = probe_velocity(backbone)
    adapters.add_teacher("a", paths[0])
    adapters.add_teacher("cat_of_a", tmp_path / "cat_of_a.safetensors")
    for method, path in written.items():
        adapters.add_teacher(method, path)
    outputs = {}
    for name in ["a", "cat_of_a", "svd", "cat", NONE]:
        adapters.activate(name)
        outputs[name] = probe_velocity(backbone)
    assert torch.allclose(outputs[NONE], base)
    assert torch.allclose(outputs["cat_of_a"], outputs["a"], atol=1e-6)

    # The reference: a fresh base with a + 0.5 b added into its Linear weights.
    fresh = Backbone.load(tiny_params.base, tiny_base_dir)
    with torch.no_grad():
        for path, weight in zip(paths, [1.0, 0.5]):
            for name, delta in deltas(read_lora(path, shapes)).items():
                fresh.transformer.get_submodule(name).weight += weight * delta
    expected = probe_velocity(fresh)
    assert not torch.allclose(expected, base, atol=1e-4)
    for method in ("svd", "cat"):
        assert torch.allclose(outputs[method], expected, atol=1e-5), (method, (outputs[method] - expected).abs().max())
