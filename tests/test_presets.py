"""The paper's setups: exact component counts on randomly initialised architectures, no download."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from coar_dask.errors import ExperimentError  # noqa: E402
from coar_dask.zoo.presets import (  # noqa: E402
    PRESETS,
    build_model,
    experiment_components,
    get_preset,
    preset_components,
    random_examples,
    seeded_model,
)
from coar_dask.zoo import architectures  # noqa: E402


# The paper's counts (notes/seed-models.md) and, as a check that the written-out
# architectures are the originals, their parameter counts (torchvision's
# resnet50 / vit_b_16, Hugging Face's GPT2LMHeadModel with tied embeddings).
EXPECTED = {
    "cifar_resnet": (2_304, None),
    "imagenet_resnet": (22_720, 25_557_032),
    "imagenet_vit": (82_944, 86_567_656),
    "gpt2_tinystories": (64_512, 124_439_808),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_counts_match_the_paper(name):
    comps = preset_components(name)
    assert len(comps) == EXPECTED[name][0] == get_preset(name).total


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_models_are_built_on_meta_with_the_original_sizes(name):
    model = build_model(name)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    if EXPECTED[name][1] is not None:
        assert sum(p.numel() for p in params) == EXPECTED[name][1]


def test_cifar_resnet_is_nine_convs_of_256():
    comps = preset_components("cifar_resnet")
    assert comps.modules == ["conv1"] + [f"layer.{b}.conv{i}" for b in range(4) for i in (1, 2)]
    assert {g.n_units for g in comps.groups} == {256}


def test_resnet50_excludes_downsample_convs():
    comps = preset_components("imagenet_resnet")
    assert len(comps.groups) == 1 + 16 * 3
    assert not any("downsample" in m for m in comps.modules)
    assert comps.index("layer4.2.conv3").size == 2048


def test_vit_block_is_in_proj_out_proj_and_mlp_rows():
    comps = preset_components("imagenet_vit")
    block = "encoder.layers.encoder_layer_0"
    first = [(g.module, g.kind, g.param, g.n_units) for g in comps.groups[:4]]
    assert first == [
        (f"{block}.self_attention", "mha_in_proj", "in_proj_weight", 2304),
        (f"{block}.self_attention.out_proj", "linear", "weight", 768),
        (f"{block}.mlp.0", "linear", "weight", 3072),
        (f"{block}.mlp.3", "linear", "weight", 768),
    ]
    assert len(comps.groups) == 48
    assert not any(m.startswith("heads") or m == "conv_proj" for m in comps.modules)


def test_gpt2_units_are_conv1d_input_rows():
    comps = preset_components("gpt2_tinystories")
    h0 = [(g.module, g.n_units) for g in comps.groups[:4]]
    assert h0 == [("transformer.h.0.attn.c_attn", 768), ("transformer.h.0.attn.c_proj", 768),
                  ("transformer.h.0.mlp.c_fc", 768), ("transformer.h.0.mlp.c_proj", 3072)]
    model = build_model("gpt2_small")
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert type(c_attn).__name__ == "Conv1D" and tuple(c_attn.weight.shape) == (768, 2304)
    assert "lm_head" not in comps.modules


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ExperimentError, match="imagenet_vit"):
        get_preset("resnet")


@pytest.mark.parametrize(
    "builder, kwargs, x",
    [
        (architectures.mini_resnet, {"in_planes": 8, "num_blocks": 2}, torch.randn(2, 3, 32, 32)),
        (architectures.cifar_resnet18, {"width": 4}, torch.randn(2, 3, 32, 32)),
        (architectures.vit_b_16, {"image_size": 32, "patch_size": 8, "num_layers": 2, "hidden_dim": 16,
                                  "num_heads": 2, "mlp_dim": 24, "num_classes": 7}, torch.randn(2, 3, 32, 32)),
        (architectures.gpt2_small, {"vocab_size": 50, "n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2},
         torch.randint(0, 50, (2, 5))),
    ],
)
def test_small_variants_run_forward(builder, kwargs, x):
    torch.manual_seed(0)
    model = builder(**kwargs).eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.slow
def test_resnet50_runs_forward():
    torch.manual_seed(0)
    with torch.no_grad():
        out = architectures.resnet50().eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)


def test_seeded_model_is_the_same_in_every_call_and_leaves_the_global_rng():
    before = torch.random.get_rng_state()
    a = seeded_model("coar_dask.zoo.architectures:cifar_resnet18", seed=3, width=4)
    b = seeded_model("coar_dask.zoo.architectures:cifar_resnet18", seed=3, width=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(before, torch.random.get_rng_state())
    assert not a.training
    c = seeded_model("cifar_resnet", in_planes=4, num_blocks=1)  # a preset name works too
    assert len(list(c.parameters())) > 0


def test_random_examples_are_seeded():
    x, y = random_examples(5, (3, 4, 4), classes=3, seed=1)
    x2, y2 = random_examples(5, [3, 4, 4], classes=3, seed=1)
    assert x.shape == (5, 3, 4, 4) and torch.equal(x, x2) and torch.equal(y, y2) and int(y.max()) < 3


def test_experiment_components_calls_only_the_model_factory(tmp_path, tiny_experiment):
    path = tmp_path / "e.yaml"
    tiny_experiment.to_yaml(path)
    comps = experiment_components(path)
    assert comps.modules == ["0", "3", "7", "9"] and len(comps) == 4 + 6 + 8 + 5
    with pytest.raises(ExperimentError, match="does not exist"):
        experiment_components(tmp_path / "missing.yaml")


def test_presets_table_in_docs_lists_every_preset():
    import coar_dask.zoo.presets as mod

    for name in PRESETS:
        assert f"``{name}``" in mod.__doc__
    assert all(p.input_shape for p in PRESETS.values())


def test_preset_names_are_the_configs_folders_and_old_names_still_work():
    from pathlib import Path

    from coar_dask.zoo.presets import ALIASES

    configs = Path(__file__).resolve().parents[1] / "configs"
    folders = {p.name for p in configs.iterdir() if p.is_dir()}
    assert set(PRESETS) == folders
    for old, new in ALIASES.items():
        assert get_preset(old) is get_preset(new)
        assert old not in PRESETS
