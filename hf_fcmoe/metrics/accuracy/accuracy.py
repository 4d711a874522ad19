"""Accuracy as an `evaluate` metric module shipped inside hf_fcmoe.

`evaluate.load("accuracy")` fetches its module from the Hub, which fails offline; this file is
loadable with `evaluate.load(<this folder>)` anywhere. Same inputs and output as the Hub metric
(predictions, references, optional sample_weight, normalize), computed with numpy (no sklearn).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction (or, with normalize=False, the number) of predictions equal to their reference."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): return the fraction (default) instead of the count of correct predictions.
    sample_weight (list of float): optional per-example weights.
Returns:
    accuracy (float): the (weighted) fraction or count of correct predictions.
Example:
    >>> metric = evaluate.load("hf_fcmoe/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(float)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
