"""Hugging Face models (the ``hf`` extra), real and tiny, random and seeded, nothing downloaded.

- a tiny GPT-2 (``GPT2Config``, 2 layers, width 64: 896 components) with
  padded sequences: ``lm_margin`` and a custom output equal deepcopy-and-zero
  on both ablation paths, and the fast path is the one used;
- a tiny BERT-style encoder classifier (``model(**inputs)``, ``.logits``):
  ``margin`` likewise;
- GPT-2 small's count from its config, without weights: 64,512 (the
  config's selection, on the real ``transformers`` classes);
- build -> fit -> evaluate on a LocalCluster, ``lm_margin`` and a custom
  output given by import path in YAML: held-out correlation >= 0.9 at alpha
  0.025 and 2,000 rows (the issue's acceptance; the figures are printed);
- the README's "Bring your own Hugging Face model" script, run as a user
  runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from coar_dask import Experiment, Spec, evaluate, fit, init_store, run_build  # noqa: E402
from coar_dask.ablation import engine  # noqa: E402
from coar_dask.ablation.engine import compute_outputs  # noqa: E402
from conftest import deepcopy_reference as reference  # noqa: E402
from coar_dask.core.components import select_components  # noqa: E402
from coar_dask.core.experiment import load_state  # noqa: E402
from coar_dask.core.outputs import find_logits, input_ids_and_mask  # noqa: E402
from coar_dask.zoo.hf import GPT2_SMALL_COMPONENTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2_SELECTION = dict(include=[r"attn\.c_attn$", r"attn\.c_proj$", r"mlp\.c_fc$", r"mlp\.c_proj$"], kinds=["conv1d"])


def last_token_logprob(out, batch):
    """A custom output: log-probability of each sequence's last real token given what precedes it."""
    logits = find_logits(out).float()
    ids, mask = input_ids_and_mask(batch)
    last = mask.sum(1) - 1
    rows = torch.arange(ids.shape[0], device=ids.device)
    return logits[rows, last - 1].log_softmax(-1)[rows, ids[rows, last]]


def tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def bert_examples():
    from coar_dask.zoo.hf import token_examples

    inputs = token_examples(n=10, max_len=12, vocab_size=64, seed=1)
    return inputs, torch.arange(10) % 3


def gpt2_experiment(**kw):
    base = dict(model="coar_dask.zoo.hf:tiny_gpt2", examples="coar_dask.zoo.hf:token_examples",
                output="lm_margin", alpha=0.025, batch_size=32, **GPT2_SELECTION)
    return Experiment(**{**base, **kw})


def masks_for(state, n=6, alpha=0.2):
    masks = np.random.default_rng(0).random((n, state.n_components)) >= alpha
    masks[0] = True
    masks[1, ::3] = False
    return masks


@pytest.mark.parametrize("output", ["lm_margin", "lm_logprob", "test_hf:last_token_logprob"])
@pytest.mark.parametrize("batch_size", [32, 5])
def test_tiny_gpt2_outputs_equal_deepcopy_and_zero(output, batch_size):
    state = load_state(gpt2_experiment(output=output, batch_size=batch_size))
    assert state.n_components == 896 and state.n_examples == 32
    assert int(state.inputs["attention_mask"].sum(1).min()) < 32  # padded sequences
    masks = masks_for(state)
    ref = reference(state, masks)
    assert np.array_equal(compute_outputs(state, masks, masks_per_pass=1), ref)
    got = compute_outputs(state, masks, masks_per_pass=3)
    runner = engine._runner(state)
    assert runner.batched is not None and runner.verified, runner.reason  # the fast path, not a fallback
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_tiny_bert_classifier_margin_equals_deepcopy_and_zero():
    exp = Experiment(model="test_hf:tiny_bert", examples="test_hf:bert_examples", kinds=["linear"],
                     exclude=["classifier"], output="margin", batch_size=4)
    state = load_state(exp)
    masks = masks_for(state)
    ref = reference(state, masks)
    assert np.array_equal(compute_outputs(state, masks, masks_per_pass=1), ref)
    got = compute_outputs(state, masks, masks_per_pass=4)
    assert engine._runner(state).batched is not None
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_gpt2_small_count_from_its_config_without_weights():
    config = Experiment.from_yaml(ROOT / "configs/gpt2_tinystories/experiment.yaml")
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    comps = select_components(model, include=config.include, exclude=config.exclude, kinds=config.kinds)
    assert len(comps) == GPT2_SMALL_COMPONENTS == 12 * (768 + 768 + 768 + 3072)
    assert config.output == "lm_margin" and config.alpha == 0.025
    assert {g.n_units for g in comps.groups} == {768, 3072}  # input rows of the transposed Conv1D weights


def test_gpt2_config_builds_with_its_own_factory_on_a_saved_tiny_model(tmp_path):
    """configs/gpt2_tinystories as written (from_pretrained, lm_margin, alpha 0.025, test_margins), with a
    tiny GPT-2 saved locally as the weights and padded token sequences as the examples."""
    from coar_dask.zoo.hf import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    config = Experiment.from_yaml(ROOT / "configs/gpt2_tinystories/experiment.yaml")
    exp = config.replace(model_kwargs={**config.model_kwargs, "pretrained_model_name_or_path": str(tmp_path / "gpt2")},
                         examples="coar_dask.zoo.hf:token_examples", examples_kwargs={"n": 12}, device="cpu")
    state = load_state(exp)
    assert state.n_components == 896 and state.output_fn.__name__ == "lm_margin"
    store = init_store(tmp_path / "store", Spec.for_experiment(20, n_components=896, n_outputs=12,
                                                               y_name="test_margins"), rows_per_chunk=10)
    run_build(store, exp)
    for block in (0, 1):
        margins = store.read_verified(block, ["test_margins"])["test_margins"]
        assert margins.shape == (10, 12) and np.isfinite(margins).all() and margins.std() > 0


def _attribute(tmp_path, experiment, client, rows=2000, held_out=200):
    state = load_state(experiment)
    spec = Spec.for_experiment(rows, n_components=state.n_components, n_outputs=state.n_examples)
    store = init_store(tmp_path / "store", spec)
    eval_store = init_store(tmp_path / "eval", spec.with_num_models(held_out))
    run_build(store, experiment, client=client)
    run_build(eval_store, experiment.replace(mask_seed=1), client=client)
    return evaluate(fit(store), eval_store)


@pytest.mark.slow
def test_tiny_gpt2_attributions_on_a_local_cluster(tmp_path):
    """The issue's acceptance: lm_margin, and a custom output by import path from YAML, both >= 0.9."""
    from coar_dask.runtime.clusters import cluster_client

    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(gpt2_experiment(output="test_hf:last_token_logprob").to_dict()))
    with cluster_client("local", n_workers=2) as client:
        lm = _attribute(tmp_path / "lm", gpt2_experiment(), client)
        custom = _attribute(tmp_path / "custom", Experiment.from_yaml(path), client)
    print(f"\ntiny GPT-2, 896 components, 32 sequences, 2,000 rows, alpha 0.025: held-out mean correlation "
          f"lm_margin {lm.mean:.3f}, custom output {custom.mean:.3f}")
    assert lm.mean >= 0.9 and custom.mean >= 0.9


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_hugging_face_script_runs_as_a_user_runs_it(tmp_path):
    code = readme_block("Bring your own Hugging Face model")
    assert len([line for line in code.splitlines() if line.strip()]) < 25
    (tmp_path / "attribute_gpt2.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "attribute_gpt2.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    mean = float(re.search(r"held-out correlation: mean ([0-9.]+)", done.stdout).group(1))
    assert mean >= 0.8, done.stdout
