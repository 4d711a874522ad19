"""Label-scoring accuracy: the predicted class is the label word the model finds most likely after the prompt.

Scoring, not generation: no decoding choices, and every model gets a prediction in the label set.
Tokenization mirrors TRL's prompt-completion training (prompt ids = tokenize(prompt), completion ids =
the rest of tokenize(prompt + completion)), so the scored tokens are the ones the model was trained on.
Log-likelihoods come from the logits, never from `loss`, so an MoE's router aux loss cannot leak in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import ClassLabel, Dataset
from torch import Tensor, nn

from hf_fcmoe.data.formatting import LABEL_PREFIX
from hf_fcmoe.metrics import load_metric


def label_scoring_accuracy(label_logprobs: Tensor, gold: Tensor) -> float:
    """Fraction of rows whose highest-scoring label (first one on ties) is the gold index; NaN when empty."""
    if label_logprobs.ndim != 2 or gold.shape != label_logprobs.shape[:1]:
        raise ValueError(
            f"need scores (N, num_labels) and gold (N,), got {tuple(label_logprobs.shape)} and {tuple(gold.shape)}"
        )
    if len(gold) == 0:
        return float("nan")
    if gold.min() < 0 or gold.max() >= label_logprobs.shape[1]:
        raise ValueError(f"gold labels must lie in [0, {label_logprobs.shape[1]}), got {gold.tolist()}")
    predictions = label_logprobs.argmax(dim=1)
    result = load_metric("accuracy").compute(predictions=predictions.tolist(), references=gold.tolist())
    return float(result["accuracy"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _sequences(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> list[tuple[list[int], int]]:
    """(prompt + completion ids, where the completion starts) for every prompt x completion pair, row-major.

    The completion starts where tokenize(prompt) and tokenize(prompt + completion) diverge, as in TRL.
    """
    out = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        for completion in completions:
            ids = tokenizer(prompt + completion)["input_ids"]
            start = _common_prefix(prompt_ids, ids)
            if start == 0 or start == len(ids):
                raise ValueError(
                    f"cannot score completion {completion!r} after prompt {prompt[-40:]!r}: it needs a "
                    "non-empty prompt and must add tokens"
                )
            out.append((ids, start))
    return out


def _forward_kwargs(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {"output_router_logits": False} if getattr(config, "output_router_logits", None) is not None else {}


@torch.no_grad()
def score_labels(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    label_words: Sequence[str],
    batch_size: int = 16,
    prefix: str = LABEL_PREFIX,
    append_eos: bool = True,
) -> Tensor:
    """(N, num_labels) sums of the label-word token log-likelihoods given each prompt.

    The scored completion is prefix + word (+ eos, as TRL appends it in training): the eos makes the
    score that of the complete word, so a label that is a prefix of another ("Sci" / "Sci/Tech") is not favoured.
    """
    eos = tokenizer.eos_token if append_eos and tokenizer.eos_token else ""
    sequences = _sequences(tokenizer, prompts, [prefix + word + eos for word in label_words])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)  # scored[b, t]: token t+1 is a label token
        for b, (ids, num_prompt) in enumerate(chunk):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            scored[b, num_prompt - 1 : len(ids) - 1] = True
        input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **_forward_kwargs(model)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logprobs = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        scores.append((token_logprobs * scored).sum(dim=1).cpu())
    model.train(was_training)
    return torch.cat(scores).view(len(prompts), len(label_words))


def label_scoring_inputs(dataset: Dataset) -> tuple[list[str], Tensor, list[str]]:
    """Prompts, gold indices and label words of a classification split made by `to_training_format`."""
    feature = dataset.features.get("label")
    if "prompt" not in dataset.column_names or not isinstance(feature, ClassLabel):
        raise ValueError(
            "label scoring needs a classification split (columns 'prompt' and a ClassLabel 'label', as made by "
            f"to_training_format(task='classification')); got columns {dataset.column_names}"
        )
    return list(dataset["prompt"]), torch.tensor(dataset["label"], dtype=torch.long), list(feature.names)


def evaluate_label_scoring(model: nn.Module, tokenizer, dataset: Dataset, batch_size: int = 16) -> float:
    """Label-scoring accuracy of `model` on a classification split."""
    prompts, gold, words = label_scoring_inputs(dataset)
    return label_scoring_accuracy(score_labels(model, tokenizer, prompts, words, batch_size), gold)
