"""Model output functions: the one number recorded per example under each mask.

An output function is called as ``fn(out, batch)`` and returns a float
tensor of shape ``(B,)``:

``out``
    whatever the model returned: a tensor, a tuple, or an object with
    ``.logits`` (a Hugging Face ``ModelOutput``).
``batch``
    a :class:`Batch`: ``inputs`` (a tensor, or a mapping of tensors passed
    as ``model(**inputs)``), ``labels`` (a tensor, or ``None``) and ``index``
    (a LongTensor: the positions of the batch's examples in the examples
    set, so an output may look up per-example constants).

Built-ins (:data:`OUTPUTS`) find the logits with :func:`find_logits`:

``margin``
    correct-class logit minus the largest other logit (the seed's margin);
    logits ``(B, C)``, labels ``(B,)``.
``correct_logit``
    the correct class's logit.
``lm_margin``
    the seed's GPT-2 output: for each sequence, the mean over its real
    next-token positions of the correct next token's logit minus the largest
    other logit. Logits ``(B, T, V)``; the next tokens are the input ids
    shifted by one; position ``t`` counts when tokens ``t`` and ``t + 1``
    are both real (attention mask 1; no mask: every position).
``lm_logprob``
    the mean log-probability of the next tokens over the same positions.

A new built-in registers with :func:`register_output`; any other function is
named in the experiment by import path, ``"package.module:function"``.

Examples
--------
>>> import torch
>>> from coar_dask.core.outputs import Batch, margin
>>> out = torch.tensor([[2.0, 0.5, 1.0]])
>>> margin(out, Batch(out, torch.tensor([0]), torch.tensor([0]))).tolist()
[1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from coar_dask.errors import OutputError

__all__ = [
    "Batch",
    "OUTPUTS",
    "check_values",
    "correct_logit",
    "find_logits",
    "get_output",
    "input_ids_and_mask",
    "lm_logprob",
    "lm_margin",
    "margin",
    "register_output",
]

OutputFn = Callable[[Any, "Batch"], Any]

#: Registered output functions, by name (see :func:`register_output`).
OUTPUTS: dict[str, OutputFn] = {}


@dataclass(frozen=True)
class Batch:
    """What an output function sees of the examples of one forward pass.

    Attributes
    ----------
    inputs
        The model's input: a tensor, or a mapping of tensors (passed as
        ``model(**inputs)``), ``B`` rows each.
    labels
        The labels of these examples (a tensor), or ``None`` when the
        examples factory returned inputs alone.
    index
        LongTensor ``(B,)``: each row's position in the examples set (rows
        repeat when several masks share a forward pass).
    """

    inputs: Any
    labels: Any
    index: Any

    def __len__(self) -> int:
        return int(self.index.shape[0])


def register_output(name: str, *, replace: bool = False) -> Callable[[OutputFn], OutputFn]:
    """Decorator: register ``fn(out, batch) -> (B,)`` as the built-in output ``name``.

    Examples
    --------
    >>> @register_output("first_logit")                       # doctest: +SKIP
    ... def first_logit(out, batch):
    ...     return find_logits(out, "first_logit")[:, 0].float()
    """

    def decorate(fn: OutputFn) -> OutputFn:
        if name in OUTPUTS and not replace:
            raise OutputError(f"output {name!r} is already registered; pass replace=True to redefine it.")
        OUTPUTS[name] = fn
        return fn

    return decorate


def find_logits(out: Any, output: str = "output") -> Any:
    """The logits in a model's output: the tensor itself, a tuple's first element, or ``.logits``."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    found = type(out).__name__
    if isinstance(out, Mapping):
        found += f" with keys {sorted(map(str, out))[:8]}"
    elif isinstance(out, (tuple, list)):
        found += f" of {[type(v).__name__ for v in out][:4]}"
    raise OutputError(
        f"output {output!r} needs logits, but the model returned a {found} (no tensor, no tuple starting "
        f"with one, no .logits); return logits from the model or give your own output 'module:function'."
    )


def _float(t: Any) -> Any:
    """``t`` as float32 at least: AMP's float16/bfloat16 widened, a float64 model's logits kept float64."""
    return t if t.is_floating_point() and t.element_size() >= 4 else t.float()


def _class_logits(out: Any, batch: Any, output: str) -> tuple[Any, Any]:
    """(logits (B, C) float, labels (B,)); ``batch`` may also be the labels tensor (the old call form)."""
    logits = _float(find_logits(out, output))
    labels = batch.labels if isinstance(batch, Batch) else batch
    if labels is None:
        raise OutputError(
            f"output {output!r} needs labels but the examples factory returned inputs alone; return "
            f"(inputs, labels), or use an output that needs none (lm_margin, lm_logprob, or your own)."
        )
    if logits.ndim != 2:
        raise OutputError(
            f"output {output!r} needs logits of shape (batch, classes); the model returned "
            f"{tuple(logits.shape)} (for next-token logits (batch, tokens, vocab) use lm_margin)."
        )
    return logits, labels


@register_output("margin")
def margin(out: Any, batch: Any) -> Any:
    """Correct-class logit minus the largest other logit (the seed's margin)."""
    logits, labels = _class_logits(out, batch, "margin")
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - others.max(dim=1).values


@register_output("correct_logit")
def correct_logit(out: Any, batch: Any) -> Any:
    """The logit of the correct class."""
    logits, labels = _class_logits(out, batch, "correct_logit")
    return logits.gather(1, labels[:, None]).squeeze(1)


def input_ids_and_mask(batch: Batch, output: str = "output") -> tuple[Any, Any]:
    """Token ids ``(B, T)`` and attention mask ``(B, T)`` (ones when absent) of a batch."""
    import torch

    inputs = batch.inputs
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise OutputError(
                f"output {output!r} needs token ids: the inputs mapping has keys {sorted(inputs)} but no "
                f"'input_ids'; pass the tokenizer's output, or write your own output."
            )
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        ids, mask = inputs, None
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point():
        raise OutputError(f"output {output!r} needs integer token ids of shape (batch, tokens); found "
                          f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}.")
    return ids, (torch.ones_like(ids) if mask is None else mask)


def _next_token_logits(out: Any, batch: Batch, output: str) -> tuple[Any, Any, Any]:
    """(logits (B, T-1, V) float, next tokens (B, T-1), weights (B, T-1) of the real positions)."""
    logits = find_logits(out, output)
    ids, mask = input_ids_and_mask(batch, output)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise OutputError(
            f"output {output!r} needs next-token logits (batch, tokens, vocab) matching the input ids "
            f"{tuple(ids.shape)}; the model returned {tuple(logits.shape)}."
        )
    real = mask.bool()
    weights = (real[:, :-1] & real[:, 1:]).float()
    return _float(logits[:, :-1]), ids[:, 1:], weights


def _mean_over_positions(values: Any, weights: Any) -> Any:
    # 0/0 = NaN for a sequence with fewer than two real tokens: the first-batch check names it.
    return (values * weights).sum(1) / weights.sum(1)


@register_output("lm_margin")
def lm_margin(out: Any, batch: Batch) -> Any:
    """Mean over each sequence's real next-token positions of (correct next-token logit - largest other)."""
    logits, targets, weights = _next_token_logits(out, batch, "lm_margin")
    correct = logits.gather(2, targets[..., None]).squeeze(2)
    others = logits.scatter(2, targets[..., None], float("-inf"))
    return _mean_over_positions(correct - others.max(dim=2).values, weights)


@register_output("lm_logprob")
def lm_logprob(out: Any, batch: Batch) -> Any:
    """Mean log-probability of each sequence's real next tokens."""
    logits, targets, weights = _next_token_logits(out, batch, "lm_logprob")
    logprobs = logits.log_softmax(dim=2).gather(2, targets[..., None]).squeeze(2)
    return _mean_over_positions(logprobs, weights)


def get_output(name: str) -> OutputFn:
    """The output function registered as ``name``."""
    try:
        return OUTPUTS[name]
    except KeyError:
        raise OutputError(
            f"unknown output {name!r}; choose one of {sorted(OUTPUTS)} or give your own function as "
            f"'package.module:function'."
        ) from None


def check_values(values: Any, n: int, output: str) -> None:
    """Raise :class:`OutputError` unless ``values`` is a finite float tensor of shape ``(n,)``."""
    import torch

    if not isinstance(values, torch.Tensor):
        raise OutputError(f"output {output!r} returned a {type(values).__name__}; return a float tensor of "
                          f"shape ({n},), one value per example of the batch.")
    if tuple(values.shape) != (n,):
        raise OutputError(
            f"output {output!r} returned shape {tuple(values.shape)} for a batch of {n} examples; return shape "
            f"({n},), one value per example (reduce over tokens or classes inside the function)."
        )
    if not values.is_floating_point():
        raise OutputError(f"output {output!r} returned {values.dtype}; return a floating-point tensor "
                          f"(e.g. values.float()).")
    bad = torch.nonzero(~torch.isfinite(values)).reshape(-1)
    if bad.numel():
        raise OutputError(
            f"output {output!r} returned NaN/inf on the first batch for examples {bad[:10].tolist()}; fix the "
            f"function or those examples (an lm output needs at least two real tokens per sequence)."
        )
