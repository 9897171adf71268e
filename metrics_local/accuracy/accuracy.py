"""Accuracy as an ``evaluate`` metric module, loaded from this directory so nothing is downloaded.

``evaluate.load("accuracy")`` fetches the metric script from the Hugging Face Hub; ``scripts/run_clm.py``
loads this one instead with ``evaluate.load("<repo>/metrics_local/accuracy")``. It computes what the Hub's
``accuracy`` computes (``sklearn.metrics.accuracy_score``): the fraction, or with ``normalize=False`` the
count, of predictions equal to their references, optionally weighted by ``sample_weight``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground truth labels.
    normalize (`bool`): if False, return the number of correct predictions instead of their fraction.
    sample_weight (`list` of `float`): per-sample weights; default None (all 1).
Returns:
    accuracy (`float` or `int`): in [0, 1] when normalize is True, else the (weighted) count.
Examples:
    >>> metric = evaluate.load("metrics_local/accuracy")
    >>> metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and others},
journal={Journal of Machine Learning Research}, volume={12}, pages={2825--2830}, year={2011}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
                if self.config_name == "multilabel"
                else {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        correct = (predictions == references).reshape(len(predictions), -1).all(axis=1)  # multilabel: all equal
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        score = float((correct * weights).sum())
        if normalize:
            score /= float(weights.sum())
        return {"accuracy": score}
