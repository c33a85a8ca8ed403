"""Outputs fn(out, batch) and the examples' forms, on small torch models (no transformers needed).

- built-ins find logits in a tensor, a tuple's first element or ``.logits``;
  ``lm_margin``/``lm_logprob`` equal a hand-written per-position loop;
- outputs by name, by import path (YAML and Python API) and as a function;
- examples as (inputs, labels), inputs alone, a mapping (``model(**inputs)``)
  and a map-style Dataset give the same outputs, on both ablation paths,
  equal to the deepcopy-and-zero reference;
- bad input fails on the first batch, in one line, exit code 2, nothing written.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from coar_dask import Batch  # noqa: E402
from coar_dask.ablation import engine  # noqa: E402
from coar_dask.ablation.engine import compute_outputs  # noqa: E402
from conftest import deepcopy_reference as reference  # noqa: E402
from coar_dask.cli.main import main  # noqa: E402
from coar_dask.core.experiment import Experiment, load_state, resolve_output  # noqa: E402
from coar_dask.core.outputs import OUTPUTS, find_logits, get_output, lm_logprob, lm_margin, margin, register_output  # noqa: E402,E501
from coar_dask.errors import ExperimentError, OutputError  # noqa: E402

V, T, N = 11, 7, 9


class ToyLM(nn.Module):
    """Embedding -> Linear -> Linear: logits (B, T, V); returns a tensor, a tuple or an object with .logits."""

    def __init__(self, wrap: str = "tensor"):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(V, 8)
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, V)
        self.wrap = wrap

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc(self.wte(input_ids)))
        logits = self.head(h)
        if attention_mask is not None:
            logits = logits * attention_mask[..., None]  # uses the mask, so a missing one changes outputs
        return {"tensor": logits, "tuple": (logits, h), "object": SimpleNamespace(logits=logits)}[self.wrap]


def toy_lm(wrap: str = "tensor"):
    return ToyLM(wrap).eval()


def toy_tokens(n: int = N):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def toy_ids():
    return toy_tokens()["input_ids"]


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.data = toy_tokens()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def toy_dataset():
    return TokenDataset()


def unequal_tokens():
    data = toy_tokens()
    data["attention_mask"] = data["attention_mask"][:-2]
    return data


def short_tokens():
    data = toy_tokens()
    data["attention_mask"][4, 1:] = 0  # one real token: no next-token position
    return data


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def class_examples():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def class_inputs_only():
    return class_examples()[0]


# -- custom outputs (imported by path, as a user's module would be) -----------
OFFSETS = torch.linspace(-1, 1, N)


def first_token_logit(out, batch):
    """A custom output using batch.index: the first position's logit of token 1, plus a per-example constant."""
    return find_logits(out)[:, 0, 1].float() + OFFSETS.to(batch.index.device)[batch.index]


def wrong_shape(out, batch):
    return find_logits(out)[:, 0].float()


def integer_output(out, batch):
    return find_logits(out)[:, 0, 0].long()


def nan_output(out, batch):
    values = find_logits(out)[:, 0, 0].float().clone()
    values[1] = float("nan")
    return values


def no_logits_model():
    class Words(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return {"scores": self.fc(x)}

    return Words().eval()


# -- references ----------------------------------------------------------------


def lm_margin_loop(logits, ids, mask):
    """The seed's GPT-2 output, one sequence and one position at a time."""
    out = []
    for b in range(ids.shape[0]):
        margins = []
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1]:
                row = logits[b, t].double()
                correct = row[ids[b, t + 1]]
                others = torch.cat([row[: ids[b, t + 1]], row[ids[b, t + 1] + 1 :]])
                margins.append(float(correct - others.max()))
        out.append(np.mean(margins))
    return np.array(out)


def experiment(**kw):
    base = dict(model="test_outputs:toy_lm", examples="test_outputs:toy_tokens", kinds=["linear"],
                output="lm_margin", alpha=0.2, batch_size=4)
    return Experiment(**{**base, **kw})


def masks_for(state, n=5, seed=0):
    masks = np.random.default_rng(seed).random((n, state.n_components)) >= 0.3
    masks[0] = True
    return masks


# ------------------------------------------------------------------- built-ins


def test_find_logits_in_a_tensor_a_tuple_and_dot_logits():
    x = torch.randn(2, 3)
    for out in (x, (x, None), [x], SimpleNamespace(logits=x), {"logits": x}):
        assert find_logits(out) is x
    with pytest.raises(OutputError, match=r"dict with keys \['scores'\].*no .logits"):
        find_logits({"scores": x}, "margin")


def test_lm_margin_and_logprob_equal_a_loop_over_positions():
    data = toy_tokens()
    logits = torch.randn(N, T, V)
    batch = Batch(data, None, torch.arange(N))
    expect = lm_margin_loop(logits, data["input_ids"], data["attention_mask"])
    np.testing.assert_allclose(lm_margin(logits, batch).numpy(), expect, rtol=1e-5, atol=1e-5)
    logp = logits.log_softmax(-1)
    ids, mask = data["input_ids"], data["attention_mask"]
    manual = [np.mean([float(logp[b, t, ids[b, t + 1]]) for t in range(T - 1) if mask[b, t] and mask[b, t + 1]])
              for b in range(N)]
    np.testing.assert_allclose(lm_logprob(logits, batch).numpy(), manual, rtol=1e-5, atol=1e-5)
    # ids alone: every position is real
    ones = torch.ones_like(ids)
    np.testing.assert_allclose(lm_margin((logits,), Batch(ids, None, torch.arange(N))).numpy(),
                               lm_margin_loop(logits, ids, ones), rtol=1e-5, atol=1e-5)


def test_margin_keeps_the_old_call_form_and_register_output():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.equal(margin(logits, labels), margin(logits, Batch(logits, labels, torch.arange(4))))

    @register_output("test_second_logit")
    def second(out, batch):
        return find_logits(out)[:, 1].float()

    try:
        assert get_output("test_second_logit") is second and resolve_output("test_second_logit") is second
        with pytest.raises(OutputError, match="already registered"):
            register_output("test_second_logit")(second)
    finally:
        OUTPUTS.pop("test_second_logit")
    with pytest.raises(OutputError, match="'package.module:function'"):
        get_output("no_such_output")


def test_output_by_name_path_or_function_is_recorded_as_a_string():
    by_path = experiment(output="test_outputs:first_token_logit")
    assert experiment(output=first_token_logit).output == "test_outputs:first_token_logit"
    assert experiment(output=first_token_logit).fingerprint == by_path.fingerprint
    assert Experiment.from_dict(by_path.to_dict()) == by_path
    with pytest.raises(ExperimentError, match="top level of a module"):
        experiment(output=lambda out, batch: out)
    with pytest.raises(ExperimentError, match="unknown output"):
        experiment(output="margni")


# ------------------------------------------------------------ forms of examples


@pytest.mark.parametrize("wrap", ["tensor", "tuple", "object"])
@pytest.mark.parametrize("examples", ["test_outputs:toy_tokens", "test_outputs:toy_dataset"])
@pytest.mark.parametrize("output", ["lm_margin", "lm_logprob", "test_outputs:first_token_logit"])
def test_sequence_outputs_on_both_paths_equal_the_reference(wrap, examples, output):
    state = load_state(experiment(model_kwargs={"wrap": wrap}, examples=examples, output=output))
    # a Dataset is read a batch at a time (issue 23), never collated whole; its batches are mappings too
    assert isinstance(state.batch(0, 2).inputs, dict) and state.labels is None
    masks = masks_for(state)
    ref = reference(state, masks)
    assert np.array_equal(compute_outputs(state, masks, masks_per_pass=1), ref)
    got = compute_outputs(state, masks, masks_per_pass=3)
    assert engine._runner(state).batched is not None  # the fast path ran on (M x B, T, C) activations
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_dataset_tensor_and_mapping_examples_agree():
    masks = masks_for(load_state(experiment()))
    a = compute_outputs(load_state(experiment()), masks)
    b = compute_outputs(load_state(experiment(examples="test_outputs:toy_dataset")), masks)
    assert np.array_equal(a, b)
    ids_only = load_state(experiment(examples="test_outputs:toy_ids"))
    assert isinstance(ids_only.inputs, torch.Tensor)
    assert np.abs(compute_outputs(ids_only, masks) - reference(ids_only, masks)).max() < 1e-5


def test_classifier_with_inputs_alone_and_a_custom_output():
    state = load_state(experiment(model="test_outputs:classifier", examples="test_outputs:class_inputs_only",
                                  output="test_outputs:classifier_score"))
    masks = masks_for(state)
    assert state.labels is None
    assert np.abs(compute_outputs(state, masks, masks_per_pass=2) - reference(state, masks)).max() < 1e-5


def classifier_score(out, batch):
    return out.logsumexp(1)


# ------------------------------------------------------------------- bad input


BAD = [
    ({"output": "test_outputs:wrong_shape"}, "returned shape (9, 11) for a batch of 9 examples"),
    ({"output": "test_outputs:integer_output"}, "returned torch.int64; return a floating-point tensor"),
    ({"output": "test_outputs:nan_output"}, "NaN/inf on the first batch for examples [1]"),
    ({"output": "lm_margin", "examples": "test_outputs:short_tokens"}, "NaN/inf on the first batch for examples [4]"),
    ({"model": "test_outputs:no_logits_model", "examples": "test_outputs:class_examples", "output": "margin"},
     "needs logits, but the model returned a dict with keys ['scores']"),
    ({"examples": "test_outputs:unequal_tokens"}, "inputs 'attention_mask' has 7 rows but 'input_ids' has 9"),
    ({"model": "test_outputs:classifier", "examples": "test_outputs:class_inputs_only", "output": "margin"},
     "'margin' needs labels but the examples factory returned inputs alone"),
    ({"model": "test_outputs:classifier", "examples": "test_outputs:class_examples", "output": "lm_margin"},
     "needs integer token ids"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_input_fails_on_the_first_batch_in_one_line_before_anything_is_written(changes, message, tmp_path,
                                                                                   capsys):
    exp = experiment(batch_size=16, **changes)
    with pytest.raises(ExperimentError) as info:
        load_state(exp)
    assert message in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = main(["init", str(tmp_path / "store"), "--experiment", str(path), "--rows", "10"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# -------------------------------------------------------------- output dtypes


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int32", "bool"])
def test_integer_output_dtypes_are_refused(dtype, tmp_path, capsys):
    """Issue 22 item 3: a uint8 store wrapped margins (-11.66 stored as 245) and every command exited 0."""
    with pytest.raises(ExperimentError, match=rf"y_dtype must be a floating-point dtype.*found {dtype!r}"):
        experiment(y_dtype=dtype)
    data = experiment().to_dict()
    data["arrays"]["y_dtype"] = dtype
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["init", str(tmp_path / "store"), "--experiment", str(path), "--rows", "10"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "y_dtype" in err, err
    assert not (tmp_path / "store").exists()


def double_classifier():
    return classifier().double()


def double_examples():
    x, y = class_examples()
    return x.double(), y


def test_float64_outputs_stay_float64_in_the_engine(tmp_path):
    """Issue 22 item 4: the engine cast every output to float32, so a float64 store held float32 values."""
    from coar_dask.runtime.build import init_experiment_store, run_build

    exp = experiment(model="test_outputs:double_classifier", examples="test_outputs:double_examples",
                     output="margin", y_dtype="float64")
    state = load_state(exp)
    masks = masks_for(state, n=4)
    want = np.stack([reference_double(state, m) for m in masks])
    assert not np.array_equal(want, want.astype(np.float32).astype(np.float64))  # float32 would show
    for mpp in (1, 2):
        got = compute_outputs(state, masks, masks_per_pass=mpp, dtype=np.float64)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    store = init_experiment_store(tmp_path / "s", exp, 4, rows_per_chunk=2)
    run_build(store, exp)
    stored = store.array(exp.y_name)[:]
    assert stored.dtype == np.float64
    np.testing.assert_allclose(stored, np.stack([reference_double(state, m) for m in store.array("masks")[:]]),
                               rtol=0, atol=1e-12)


def reference_double(state, mask):
    from coar_dask.ablation.zeroing import reference_model

    model = reference_model(state.model, state.components, mask)
    batch = state.batch(0, state.n_examples)
    with torch.inference_mode():
        return state.output_fn(model(batch.inputs), batch).numpy()


def test_a_component_selection_that_is_not_names_is_one_coar_error():
    """Issue 22: Experiment(include=5) raised TypeError: 'int' object is not iterable."""
    from coar_dask.errors import CoarError

    for field, value in (("include", 5), ("exclude", [1, 2]), ("kinds", None)):
        with pytest.raises(CoarError, match=rf"{field} must be a name or a list of names .*found {re.escape(repr(value))}"):
            experiment(**{field: value})
