"""What every criterion shares: deep supervision over auxiliary outputs and loss weighting.

A prediction dict may carry ``"aux_outputs"``: a list of prediction dicts of intermediate decoder
layers (deep supervision). Every criterion computes the same losses on the final prediction (keys
without suffix) and on auxiliary output ``i`` (keys with suffix ``_<i>``), then multiplies each
loss by its weight. That loop and that weighting are written here once:

* :func:`aux_suffix` / :func:`expand_aux_weights`: the ``_<i>`` naming of auxiliary losses;
* :func:`supervised_outputs`: ``(suffix, prediction)`` pairs, final prediction first;
* :class:`WeightedCriterion`: base class holding ``weight_dict`` with :meth:`apply_weights`.
"""

from typing import Callable, Dict, Iterator, Mapping, Tuple

import torch
from torch import nn

__all__ = [
    "WeightedCriterion",
    "aux_suffix",
    "expand_aux_weights",
    "add_suffix",
    "supervised_outputs",
]


def aux_suffix(i: int) -> str:
    """Suffix of the losses of auxiliary output ``i`` ("" for the final prediction, i = -1)."""
    return "" if i < 0 else f"_{i}"


def expand_aux_weights(base: Mapping[str, float], num_aux_outputs: int) -> Dict[str, float]:
    """Weights of the final losses plus the ``_<i>`` copies for ``num_aux_outputs`` outputs.

    Args:
        base (dict[str, float]): loss name -> weight of the final prediction's losses.
        num_aux_outputs (int): number of supervised auxiliary outputs (0: none).

    Returns:
        dict[str, float]: ``{"loss_x": w, "loss_x_0": w, ..., "loss_x_<n-1>": w}``.
    """
    weights = dict(base)
    for i in range(num_aux_outputs):
        weights.update({f"{k}{aux_suffix(i)}": v for k, v in base.items()})
    return weights


def supervised_outputs(
    outputs: Mapping, deep_supervision: bool = True
) -> Iterator[Tuple[str, Dict]]:
    """Yield ``(suffix, prediction)``: the final prediction (suffix "") then, with deep
    supervision, every entry of ``outputs["aux_outputs"]`` (suffix ``_<i>``).

    The final prediction is ``outputs`` without its "aux_outputs" key.
    """
    yield "", {k: v for k, v in outputs.items() if k != "aux_outputs"}
    if deep_supervision:
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            yield aux_suffix(i), aux


def add_suffix(losses: Mapping[str, torch.Tensor], suffix: str) -> Dict[str, torch.Tensor]:
    """``{name + suffix: value}``."""
    return {f"{k}{suffix}": v for k, v in losses.items()}


class WeightedCriterion(nn.Module):
    """Base of the criteria: ``forward`` returns *unweighted* losses, :meth:`apply_weights`
    multiplies them by ``weight_dict`` and drops the losses that have no weight.

    Args:
        weight_dict (dict[str, float]): loss name (with ``_<i>`` suffixes for auxiliary outputs,
            see :func:`expand_aux_weights`) -> weight.
    """

    def __init__(self, weight_dict: Mapping[str, float]):
        super().__init__()
        self.weight_dict = dict(weight_dict)

    def apply_weights(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Multiply each loss by its ``weight_dict`` entry; losses without an entry are dropped.

        Args:
            losses (dict[str, Tensor]): output of ``forward``.

        Returns:
            dict[str, Tensor]: the weighted losses (what a meta-architecture returns in training).
        """
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}

    def deep_supervision_losses(
        self,
        loss_fn: Callable[..., Mapping[str, torch.Tensor]],
        outputs: Mapping,
        *args,
        deep_supervision: bool = True,
        **kwargs,
    ) -> Dict[str, torch.Tensor]:
        """``loss_fn(prediction, *args, **kwargs)`` on every supervised prediction, suffixed.

        Args:
            loss_fn (callable): prediction dict -> dict of unweighted losses.
            outputs (dict): the model's prediction dict (with optional "aux_outputs").
            deep_supervision (bool): include the auxiliary outputs.

        Returns:
            dict[str, Tensor]: the losses of all predictions, auxiliary ones with ``_<i>``.
        """
        losses: Dict[str, torch.Tensor] = {}
        for suffix, pred in supervised_outputs(outputs, deep_supervision):
            losses.update(add_suffix(loss_fn(pred, *args, **kwargs), suffix))
        return losses
