"""Hugging Face language models without a download: a tiny random GPT-2 and padded token examples.

Factories for experiments, tests and benchmarks (``transformers`` is the
``hf`` extra: ``pip install 'coar_dask[hf]'``)::

    model: {factory: coar_dask.zoo.hf:tiny_gpt2, kwargs: {n_layer: 2, n_embd: 64}}
    examples: {factory: coar_dask.zoo.hf:token_examples, kwargs: {n: 32, max_len: 32}}
    components: {include: ['c_attn$', 'c_proj$', 'c_fc$'], kinds: [conv1d]}
    output: lm_margin

A real model is ``transformers:AutoModelForCausalLM.from_pretrained`` with
``kwargs: {pretrained_model_name_or_path: gpt2}``, and real examples are a
tokenizer's output (``tokenizer(texts, padding=True, return_tensors="pt")``:
the same mapping as :func:`token_examples` returns).
"""

from __future__ import annotations

from typing import Any

from coar_dask.errors import missing_dependency

__all__ = ["tiny_gpt2", "token_examples", "GPT2_SMALL_COMPONENTS"]

#: GPT-2 small's components under the seed's selection: 12 blocks x (768 + 768 + 768 + 3,072) Conv1D input rows.
GPT2_SMALL_COMPONENTS = 64_512


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise missing_dependency("transformers", "hf", "Hugging Face models") from None
    return transformers


def tiny_gpt2(n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab_size: int = 128, n_positions: int = 64,
              seed: int = 0, device: str | None = None) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` built from a ``GPT2Config`` (seeded: the same in every process).

    Its components under the GPT-2 selection are ``n_layer x 7 x n_embd``
    (``c_attn``, ``attn.c_proj``, ``c_fc``: ``n_embd`` rows each; ``mlp.c_proj``:
    ``4 n_embd``): 896 for the defaults. ``device="meta"`` builds the
    structure without memory (counts only).
    """
    import torch

    tf = _transformers()
    config = tf.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                           n_positions=n_positions, use_cache=False,
                           bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        if device is None:
            model = tf.GPT2LMHeadModel(config)
        else:
            with torch.device(device):
                model = tf.GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(rng)
    return model.eval()


def token_examples(n: int = 32, max_len: int = 32, vocab_size: int = 128, min_len: int = 4, seed: int = 0,
                   pad_id: int = 0) -> dict[str, Any]:
    """``n`` random token sequences of ``min_len..max_len`` tokens, right-padded, as a tokenizer returns them.

    Returns ``{"input_ids": (n, max_len) long, "attention_mask": (n, max_len) long}``
    (1 = real token), for ``model(**inputs)`` and the ``lm_*`` outputs.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (n, max_len), generator=gen)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask}
