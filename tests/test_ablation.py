"""Ablation paths against the seed's deepcopy-and-zero reference, for every component kind.

Equality claims tested here:

- in-place zero/restore == deepcopy + zero, bitwise (CPU float32);
- masks per pass (forward hooks) == deepcopy + zero within ``TOL`` of the
  output scale (the larger batch may sum in another order), and the ablated
  activations themselves are bitwise the bias (or 0);
- kinds hooks cannot express fall back to in-place zeroing, bitwise.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from coar_dask.ablation import engine as ablation  # noqa: E402
from coar_dask.ablation.batched import BatchedAblation  # noqa: E402
from coar_dask.ablation.engine import auto_masks_per_pass, auto_pass_shape, compute_outputs  # noqa: E402
from coar_dask.ablation.zeroing import ablated, reference_model  # noqa: E402
from coar_dask.core.components import select_components  # noqa: E402
from coar_dask.errors import ExperimentError, NotBatchableError  # noqa: E402
from coar_dask.core.experiment import Experiment, ExperimentState  # noqa: E402
from coar_dask.core.outputs import margin  # noqa: E402

#: Batched vs reference: max |difference| <= TOL * max(1, max |reference|) (CPU float32).
TOL = 1e-5
ALL_KINDS = ("conv2d", "linear", "mha_in_proj", "conv1d")


class Conv1D(nn.Module):
    """GPT-2's Conv1D layout (weight (in, out), y = x @ W + b), optionally without bias."""

    def __init__(self, nf: int, nx: int, bias: bool = True):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf)) if bias else None

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ self.weight if self.bias is None else torch.addmm(self.bias, flat, self.weight)
        return y.view(*x.shape[:-1], self.nf)


class ConvNet(nn.Module):
    """Conv2d (with/without bias) + BatchNorm (eval) + Linear head."""

    def __init__(self, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, stride=2, bias=bias)
        self.fc = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


class TokenNet(nn.Module):
    """(B, T, D) activations: Linear on the last dim, GPT-2 Conv1D, MultiheadAttention."""

    def __init__(self, bias: bool, attention: bool = False):
        super().__init__()
        self.inp = nn.Linear(3, 8, bias=bias)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=bias) if attention else None
        self.c_fc = Conv1D(12, 8, bias=bias)
        self.c_proj = Conv1D(8, 12, bias=bias)
        self.head = nn.Linear(8, 4, bias=bias)

    def forward(self, x):
        h = self.inp(x)
        if self.attn is not None:
            h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.c_proj(torch.tanh(self.c_fc(h)))
        return self.head(h.mean(1))


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    shape = (7, 2, 6, 6) if isinstance(model, ConvNet) else (7, 4, 3)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (7,), generator=g)


def _state(model, kinds, *, batch_size=4, include=None, exclude=None, masks_per_pass=None, **run):
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = _inputs(model)
    comps = select_components(model, kinds=kinds, include=include, exclude=exclude)
    exp = Experiment(model="tests:none", examples="tests:none", batch_size=batch_size,
                     masks_per_pass=masks_per_pass, **run)
    return ExperimentState(exp, model, x, y, comps, margin, torch.device("cpu"))


def _reference(state, masks):
    """The seed's way: deepcopy + zero per mask, examples in batches of the experiment's batch size."""
    out = []
    bs = state.experiment.batch_size
    with torch.inference_mode():
        for mask in masks:
            model = reference_model(state.model, state.components, mask)
            out.append(np.concatenate([margin(model(state.inputs[s : s + bs]), state.labels[s : s + bs]).numpy()
                                       for s in range(0, state.n_examples, bs)]))
    return np.stack(out)


def _masks(n_components, n=6, alpha=0.3, seed=0):
    masks = np.random.default_rng(seed).random((n, n_components)) >= alpha
    masks[0] = True   # nothing ablated
    masks[1] = False  # everything ablated
    return masks


CASES = [
    pytest.param(lambda b: ConvNet(b), ("conv2d",), id="conv2d"),
    pytest.param(lambda b: ConvNet(b), ("linear",), id="linear-2d"),
    pytest.param(lambda b: TokenNet(b), ("linear",), id="linear-3d"),
    pytest.param(lambda b: TokenNet(b), ("conv1d",), id="conv1d"),
    pytest.param(lambda b: ConvNet(b), ("conv2d", "linear"), id="conv2d+linear"),
    pytest.param(lambda b: TokenNet(b), ("linear", "conv1d"), id="linear+conv1d"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("make, kinds", CASES)
def test_inplace_equals_reference_bitwise(make, kinds, bias):
    state = _state(make(bias), kinds)
    masks = _masks(len(state.components))
    assert np.array_equal(compute_outputs(state, masks, masks_per_pass=1), _reference(state, masks))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("make, kinds", CASES)
@pytest.mark.parametrize("m", [2, 3, 6])
def test_masks_per_pass_equal_reference(make, kinds, bias, m):
    state = _state(make(bias), kinds)
    masks = _masks(len(state.components))
    ref = _reference(state, masks)
    got = compute_outputs(state, masks, masks_per_pass=m)
    runner = ablation._runner(state)
    assert runner.batched is not None  # the hooks did the work
    assert runner.folded == isinstance(state.model, ConvNet)  # ... on a copy with BatchNorm folded in
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layer", [nn.Conv2d(3, 6, 3, padding=1), nn.Linear(5, 6)], ids=["conv2d", "linear"])
def test_ablated_output_units_are_exactly_the_bias(layer, bias):
    if not bias:
        layer = type(layer)(*((3, 6, 3) if isinstance(layer, nn.Conv2d) else (5, 6)), bias=False)
    x = torch.randn((4, 3, 5, 5) if isinstance(layer, nn.Conv2d) else (4, 5))
    comps = select_components(nn.Sequential(layer), kinds=["conv2d", "linear"])
    masks = np.ones((3, 6), dtype=bool)
    masks[1, [0, 4]] = False
    masks[2, :] = False
    model = nn.Sequential(layer).eval()
    with torch.inference_mode():
        out = BatchedAblation(model, comps).forward(x, masks).unflatten(0, (3, 4))
        for m in range(3):
            ref = reference_model(model, comps, masks[m])(x)
            assert torch.equal(out[m], ref)  # bitwise: the same layer, the same batch
        dead = out[1][:, [0, 4]]
        expect = layer.bias[[0, 4]] if bias else torch.zeros(2)
        assert torch.equal(dead, expect.view((1, 2) + (1,) * (dead.ndim - 2)).expand_as(dead))


def test_input_units_zero_the_input_feature_not_the_tensor_passed_in():
    model = nn.Sequential(Conv1D(4, 3))
    comps = select_components(model, kinds=["conv1d"])
    x = torch.randn(2, 3)
    x0 = x.clone()
    masks = np.array([[True, False, True], [False, True, True]])
    with torch.inference_mode():
        out = BatchedAblation(model, comps).forward(x, masks)
        for m in range(2):
            torch.testing.assert_close(out[2 * m : 2 * m + 2], reference_model(model, comps, masks[m])(x),
                                       rtol=0, atol=1e-6)
    assert torch.equal(x, x0)


def test_ablated_restores_the_model_bitwise_even_on_error():
    state = _state(ConvNet(True), ("conv2d", "linear"))
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with ablated(state.model, state.components, np.zeros(len(state.components), bool)):
            assert float(state.model.conv1.weight.abs().sum()) == 0
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    compute_outputs(state, _masks(len(state.components)), masks_per_pass=3)
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in state.model.modules())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mha_kinds_fall_back_to_inplace_and_equal_reference_bitwise(bias):
    state = _state(TokenNet(bias, attention=True), ALL_KINDS)
    kinds = {g.kind for g in state.components.groups}
    assert kinds == {"linear", "mha_in_proj", "conv1d"}
    masks = _masks(len(state.components))
    got = compute_outputs(state, masks, masks_per_pass=4)
    runner = ablation._runner(state)
    assert runner.batched is None and "mha_in_proj" in runner.reason
    assert np.array_equal(got, _reference(state, masks))


def test_out_proj_of_attention_is_not_hookable():
    state = _state(TokenNet(True, attention=True), ("linear",), include=["attn"])
    assert state.components.modules == ["attn.out_proj"]
    with pytest.raises(NotBatchableError, match="MultiheadAttention"):
        BatchedAblation(state.model, state.components)
    masks = _masks(len(state.components))
    assert np.array_equal(compute_outputs(state, masks, masks_per_pass=3), _reference(state, masks))


class Bypass(nn.Module):
    """Uses its Linear's weights without calling it: hooks never fire."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return nn.functional.linear(x, self.lin.weight, self.lin.bias)


class SeqFirst(nn.Module):
    """Activations are (T, B, D): the batch is not the first dimension."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: (B, T, 3)
        h = self.lin(x.transpose(0, 1))
        return self.head(h.mean(0))


@pytest.mark.parametrize("model", [Bypass(), SeqFirst()], ids=["bypass", "seq-first"])
def test_models_the_hooks_cannot_serve_fall_back_with_a_warning(model, caplog):
    state = _state(model, ("linear",))
    state.inputs = torch.randn(6, 4, 3) if isinstance(model, SeqFirst) else torch.randn(6, 4)
    state.labels = torch.randint(0, 3, (6,))
    masks = _masks(len(state.components), n=5)
    with caplog.at_level(logging.WARNING, logger="coar_dask.ablation.engine"):
        got = compute_outputs(state, masks, masks_per_pass=2)
    assert np.array_equal(got, _reference(state, masks))
    assert ablation._runner(state).batched is None and caplog.records


def test_verification_catches_models_that_mix_rows(caplog):
    class MixRows(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0, keepdim=True)  # depends on the other rows of the batch

    state = _state(MixRows(), ("linear",), batch_size=8)  # one batch: the reference is well defined
    state.inputs, state.labels = torch.randn(5, 3), torch.randint(0, 4, (5,))
    masks = _masks(len(state.components), n=4)
    with caplog.at_level(logging.WARNING, logger="coar_dask.ablation.engine"):
        got = compute_outputs(state, masks, masks_per_pass=4)
    assert "disagree" in caplog.text
    assert np.array_equal(got, _reference(state, masks))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_masks_and_batching_match_reference(data):
    state = _CACHED.setdefault("state", _state(ConvNet(True), ("conv2d", "linear"), batch_size=3))
    n = data.draw(st.integers(1, 7))
    m = data.draw(st.integers(1, 8))
    bits = data.draw(st.lists(st.booleans(), min_size=n * len(state.components), max_size=n * len(state.components)))
    masks = np.asarray(bits).reshape(n, -1)
    ref = _reference(state, masks)
    got = compute_outputs(state, masks, masks_per_pass=m)
    assert got.shape == (n, state.n_examples) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


_CACHED: dict = {}


def test_experiment_masks_per_pass_and_auto_are_used():
    state = _state(ConvNet(True), ("conv2d",), masks_per_pass=3)
    masks = _masks(len(state.components))
    ref = _reference(state, masks)
    assert np.abs(compute_outputs(state, masks) - ref).max() <= TOL * max(1.0, np.abs(ref).max())
    auto = _state(ConvNet(True), ("conv2d",))  # another random model: compare with its own reference
    ref = _reference(auto, masks)
    assert np.abs(compute_outputs(auto, masks) - ref).max() <= TOL * max(1.0, np.abs(ref).max())
    assert ablation._runner(auto).probe(auto) == 5 * 6 * 6  # conv1's map, the largest hooked activation


def test_folded_copy_follows_changes_to_the_model():
    state = _state(ConvNet(True), ("conv2d", "linear"))
    masks = _masks(len(state.components))
    compute_outputs(state, masks, masks_per_pass=3)
    assert ablation._runner(state).folded
    with torch.no_grad():  # an edit made to the model after the first call (e.g. COAR-Edit)
        state.model.conv1.weight[0] = 0
        state.model.bn.running_mean += 0.25
    ref = _reference(state, masks)
    got = compute_outputs(state, masks, masks_per_pass=3)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


def _seeded_convnet():
    torch.manual_seed(5)  # the same weights whatever ran before (ConvNet draws from the global generator)
    return ConvNet(True)


def test_channels_last_and_amp_run_and_stay_close():
    masks = _masks(9 + 0, n=4)
    base = _state(_seeded_convnet(), ("conv2d",))
    ref = _reference(base, masks)
    cl = _state(_seeded_convnet(), ("conv2d",), channels_last=True)
    got = compute_outputs(cl, masks, masks_per_pass=2)
    # each batch converted on the host as it is fed (issue 23); the example set itself is left as it was
    assert cl.batch(0, 2).inputs.is_contiguous(memory_format=torch.channels_last) and cl.inputs.is_contiguous()
    assert cl.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())
    for mode in ("bf16", "fp16"):
        amp = _state(_seeded_convnet(), ("conv2d",), amp=mode)
        seen = []
        amp.model.fc.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
        got = compute_outputs(amp, masks, masks_per_pass=2)
        assert set(seen) == {torch.bfloat16 if mode == "bf16" else torch.float16}, (mode, seen)
        assert np.isfinite(got).all() and np.abs(got - ref).max() <= 0.1 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("value, mode", [("bf16", "bf16"), ("FP16", "fp16"), ("off", "off"), (False, "off"),
                                         (None, "off")])
def test_run_amp_is_bf16_fp16_or_off(value, mode):
    """Issue 23 item 5: ``run.amp: bf16 | fp16 | off``; YAML's ``amp: off`` reads as False and means off."""
    data = {"model": "m:f", "examples": "m:g", "run": {"amp": value}}
    assert Experiment.from_dict(data).amp == mode
    assert Experiment.from_dict(Experiment.from_dict(data).to_dict()).amp == mode


@pytest.mark.parametrize("value, message", [(True, "run.amp: true is no longer accepted"),
                                            ("float16", "run.amp must be one of"), (1, "run.amp must be one of")])
def test_the_old_amp_true_and_unknown_modes_are_refused_in_one_line(value, message):
    with pytest.raises(ExperimentError, match=message) as info:
        Experiment(model="m:f", examples="m:g", amp=value)
    assert "amp: bf16" in str(info.value) and "\n" not in str(info.value)


def test_the_gpu_configs_autocast_in_bfloat16():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/experiment.yaml"))
    assert configs
    for path in configs:
        exp = Experiment.from_yaml(path)
        if exp.device.startswith("cuda"):
            assert exp.amp == "bf16", path


def test_compute_outputs_shapes_and_errors():
    state = _state(ConvNet(True), ("conv2d",))
    assert compute_outputs(state, np.ones((0, 9), bool)).shape == (0, 7)
    with pytest.raises(ExperimentError, match="2-D"):
        compute_outputs(state, np.ones(9, bool))
    with pytest.raises(ExperimentError, match="mask has 8 entries"):
        compute_outputs(state, np.ones((2, 8), bool), masks_per_pass=1)
    with pytest.raises(ExperimentError, match="positive"):
        compute_outputs(state, np.ones((2, 9), bool), masks_per_pass=0)


@settings(max_examples=100, deadline=None)
@given(k=st.integers(1, 5000), e=st.integers(1, 10**6), n=st.integers(1, 200),
       target=st.integers(1, 1 << 26), rows=st.integers(1, 1 << 14))
def test_auto_masks_per_pass_bounds(k, e, n, target, rows):
    m = auto_masks_per_pass(k, e, n, target_elements=target, max_rows=rows)
    assert 1 <= m <= n
    if m > 1:  # more than one mask only within both bounds
        assert m * k * e <= target and m * k <= rows


@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 5000), e=st.integers(1, 10**6), n=st.integers(1, 200),
       target=st.integers(1, 1 << 26), rows=st.integers(1, 1 << 14), min_rows=st.integers(1, 4096))
def test_auto_pass_shape_bounds(k, e, n, target, rows, min_rows):
    m, examples = auto_pass_shape(k, e, n, target_elements=target, max_rows=rows, min_rows=min_rows)
    assert 1 <= m <= n and 1 <= examples <= k
    if m > 1:  # a batched pass stays within both bounds
        assert m * examples * e <= target and m * examples <= rows
    if examples < k:  # examples are split only to fit two masks, into equal passes of at least min_rows rows
        assert m >= 2 and 2 * examples >= min_rows
        parts = -(-k // examples)
        assert (parts - 1) * examples < k <= parts * examples and k - (parts - 1) * examples > examples - parts
    if m == 1 and n >= 2:  # in place only when equal passes of two masks each would be under min_rows rows
        limit = min(target // (2 * e), rows // 2)  # examples of a pass that holds two masks
        assert limit < 1 or 2 * -(-k // -(-k // limit)) < min_rows


def test_auto_splits_examples_and_still_equals_reference(monkeypatch):
    """Where one mask's examples overfill a pass, auto runs two masks on halves of them; outputs are unchanged."""
    state = _state(ConvNet(True), ("conv2d", "linear"), batch_size=7)
    per_example = ablation._runner(state).probe(state)  # 5 * 6 * 6
    monkeypatch.setitem(ablation.AUTO_TARGET_ELEMENTS, "cpu", 6 * per_example)  # a pass holds 6 rows
    monkeypatch.setattr(ablation, "AUTO_MIN_ROWS", 2)
    shapes = []
    real = ablation._batched_outputs
    monkeypatch.setattr(ablation, "_batched_outputs",
                        lambda st_, masks, out, runner, m, e: shapes.append((m, e)) or real(st_, masks, out, runner, m, e))
    masks = _masks(len(state.components), n=5)
    got = compute_outputs(state, masks)
    assert shapes == [(2, 3)]  # 7 examples -> passes of 3, 3, 1 examples, two masks each
    ref = _reference(state, masks)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_digits_model_batched_equals_reference(digits_experiment):
    from coar_dask.core.experiment import load_state
    from coar_dask.core.masks import sample_masks

    state = load_state(digits_experiment)
    masks = sample_masks(0, range(6), state.n_components, 0.05)
    ref = _reference(state, masks)
    for m in (1, 3, None):
        got = compute_outputs(state, masks, masks_per_pass=m)
        assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())
