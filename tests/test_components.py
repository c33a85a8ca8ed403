"""Component kinds, selection, and flat indexing both ways."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from coar_dask.core.components import (  # noqa: E402
    ComponentGroup,
    ComponentKind,
    Components,
    KINDS,
    get_kind,
    register_kind,
    select_components,
)
from coar_dask.errors import ExperimentError  # noqa: E402
from coar_dask.cli.components import add_components_parser, components_main  # noqa: E402


class Conv1D(nn.Module):
    """GPT-2's Conv1D layout: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.c_fc = Conv1D(6, 4)
        self.head = nn.Linear(6, 2)


def test_builtin_kinds_count_units_along_their_axis():
    comps = select_components(Mixed(), kinds=["conv2d", "linear", "mha_in_proj", "conv1d"])
    by_module = {g.module: g for g in comps.groups}
    assert list(by_module) == ["conv", "attn", "attn.out_proj", "c_fc", "head"]  # named_modules() order
    assert (by_module["conv"].kind, by_module["conv"].n_units) == ("conv2d", 3)
    assert (by_module["attn"].param, by_module["attn"].axis, by_module["attn"].n_units) == ("in_proj_weight", 0, 12)
    assert (by_module["attn.out_proj"].kind, by_module["attn.out_proj"].n_units) == ("linear", 4)
    # Conv1D: weight (in=4, out=6); the seed zeroes weight[idx] -> 4 input rows.
    assert (by_module["c_fc"].kind, by_module["c_fc"].n_units) == ("conv1d", 4)
    assert len(comps) == 3 + 12 + 4 + 4 + 2


def test_conv1d_kind_matches_by_class_name_only_for_2d_weights():
    kind = get_kind("conv1d")
    assert kind.matches(Conv1D(3, 2))
    assert not kind.matches(nn.Conv1d(2, 3, 1))  # torch's Conv1d is another thing (3-D weight)
    assert not kind.matches(nn.Linear(2, 3))


def test_mha_without_packed_in_proj_is_not_matched():
    mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
    assert mha.in_proj_weight is None
    assert not get_kind("mha_in_proj").matches(mha)


def test_include_exclude_and_first_matching_kind():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 3, 1), nn.Flatten(), nn.Linear(3, 4))
    assert select_components(model, include=["^[01]$"], kinds=["conv2d"]).modules == ["0", "1"]
    assert select_components(model, exclude="^1$").modules == ["0", "3"]
    assert select_components(model, kinds="linear").modules == ["3"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kinds": ["nope"]}, "unknown component kinds"),
        ({"include": ["("]}, "not a valid regex"),
        ({"include": ["no_such_layer"]}, "no components selected"),
    ],
)
def test_selection_errors_say_what_to_fix(kwargs, match):
    with pytest.raises(ExperimentError, match=match):
        select_components(nn.Sequential(nn.Linear(2, 2)), **kwargs)


def test_register_kind_refuses_silent_redefinition():
    kind = ComponentKind("bilinear_out", lambda m: isinstance(m, nn.Bilinear), "weight", 0, lambda m: m.out_features)
    try:
        register_kind(kind)
        assert select_components(nn.Sequential(nn.Bilinear(2, 2, 5)), kinds=["bilinear_out"]).offsets[-1] == 5
        with pytest.raises(ExperimentError, match="already exists"):
            register_kind(kind)
    finally:
        KINDS.pop("bilinear_out", None)
    with pytest.raises(ValueError, match="site"):
        ComponentKind("x", bool, "weight", 0, len, site="middle")


def _components(sizes):
    return Components([ComponentGroup(f"layer{i}.conv", "conv2d", "weight", 0, n) for i, n in enumerate(sizes)])


def test_naming_both_ways():
    comps = _components([3, 5, 2])
    assert comps.names([0, 3, 9]) == ["layer0.conv[0]", "layer1.conv[0]", "layer2.conv[1]"]
    assert comps.find("layer1.conv[4]").tolist() == [7]
    assert comps.find(["layer2.conv", "layer0.conv[1]"]).tolist() == [8, 9, 1]
    assert comps.index("layer1.conv").tolist() == [3, 4, 5, 6, 7]
    assert comps.layer_slice("layer2.conv") == slice(8, 10)
    assert comps.layers_matching(r"layer[12]") == ["layer1.conv", "layer2.conv"]
    assert comps.group_index([0, 2, 3, 9]).tolist() == [0, 0, 1, 2]
    assert comps.locate(4)[0] == ["layer1.conv"]


@pytest.mark.parametrize("bad", ["layer9.conv[0]", "layer0.conv[3]", "layer0.conv[x]", "nothing"])
def test_find_rejects_unknown_names(bad):
    with pytest.raises((KeyError, IndexError)):
        _components([3, 5]).find(bad)


def test_locate_rejects_out_of_range():
    comps = _components([3, 5])
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        comps.locate([8])
    with pytest.raises(IndexError):
        comps.names([-1])
    with pytest.raises(IndexError, match="has 3 units"):
        comps.index("layer0.conv", [3])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), data=st.data())
def test_flat_index_round_trips(sizes, data):
    comps = _components(sizes)
    total = sum(sizes)
    assert len(comps) == total
    idx = np.asarray(data.draw(st.lists(st.integers(0, total - 1), max_size=30)), dtype=np.int64)
    modules, units = comps.locate(idx)
    # locate -> index is the identity, unit by unit
    back = [int(comps.index(m, [u])[0]) for m, u in zip(modules, units.tolist())]
    assert back == idx.tolist()
    # names -> find is the identity, vectorised
    assert comps.find(comps.names(idx)).tolist() == idx.tolist()
    # every unit lies inside its layer's slice
    for m, j in zip(modules, idx.tolist()):
        sl = comps.layer_slice(m)
        assert sl.start <= j < sl.stop
    assert (comps.group_index(idx) == np.asarray([comps.modules.index(m) for m in modules], dtype=np.int64)).all()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=8), data=st.data())
def test_ablated_units_are_the_false_entries(sizes, data):
    comps = _components(sizes)
    mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=len(comps), max_size=len(comps))))
    got = np.concatenate([comps.index(g.module, u) for g, u in comps.ablated_units(mask)] or [np.zeros(0, int)])
    assert got.tolist() == np.flatnonzero(~mask).tolist()


def test_ablated_units_checks_the_mask_width():
    with pytest.raises(ExperimentError, match="mask has 2 entries but there are 3"):
        _components([3]).ablated_units(np.ones(2, bool))


def test_summary_round_trip_and_table():
    comps = select_components(Mixed(), kinds=["conv2d", "linear", "mha_in_proj", "conv1d"])
    summary = comps.summary()
    assert summary["total"] == len(comps) == sum(layer["units"] for layer in summary["layers"])
    assert Components.from_summary(json.loads(json.dumps(summary))) == comps
    text = comps.table()
    assert "attn.out_proj" in text and text.splitlines()[-1].startswith(f"total: {len(comps)} components in 5")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_components_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_handler_prints_preset_json_with_total():
    out = io.StringIO()
    assert components_main(_parse(["components", "--preset", "cifar_resnet", "--json"]), out) == 0
    data = json.loads(out.getvalue())
    assert data["total"] == 2304 and len(data["layers"]) == 9 and data["preset"] == "cifar_resnet"


def test_cli_handler_prints_a_table_and_lists_presets():
    out = io.StringIO()
    components_main(_parse(["components", "--preset", "gpt2_tinystories"]), out)
    assert out.getvalue().rstrip().endswith("total: 64,512 components in 48 layers")
    out = io.StringIO()
    components_main(_parse(["components", "--list"]), out)
    assert "imagenet_vit" in out.getvalue()


def test_cli_handler_reads_an_experiment_file(tmp_path, tiny_experiment):
    path = tmp_path / "exp.yaml"
    tiny_experiment.replace(kinds=("linear",)).to_yaml(path)
    out = io.StringIO()
    components_main(_parse(["components", "--experiment", str(path), "--json"]), out)
    data = json.loads(out.getvalue())
    assert [layer["module"] for layer in data["layers"]] == ["7", "9"] and data["total"] == 13
    assert data["examples"] == 12
    out = io.StringIO()
    components_main(_parse(["components", "--experiment", str(path)]), out)
    assert out.getvalue().rstrip().endswith("examples: 12 (outputs per row)")


def test_cli_requires_a_source():
    with pytest.raises(SystemExit):
        _parse(["components"])
