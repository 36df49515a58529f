"""Reports of the numerical comparisons with official implementations
(``tools/compare_with_official_*``), and the random weights those comparisons load into the
official models.

A :class:`Report` holds one :class:`Row` per compared quantity: the largest absolute difference
between ours and the official output, the largest absolute official value (the scale the
tolerance is relative to), whether the row is within its tolerance, and a note.
:func:`randomize_state` draws non-trivial values for every floating-point tensor of a model.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["Report", "Row", "randomize_state"]

SpecialRule = Callable[[str, torch.Tensor, torch.Generator], Optional[torch.Tensor]]


def randomize_state(
    model: torch.nn.Module,
    seed: int,
    *,
    matrices: str = "noise",
    special: Optional[SpecialRule] = None,
) -> Dict[str, torch.Tensor]:
    """Random values for every floating-point tensor of ``model``'s state dict, loaded into it
    (strictly) and returned. Integer buffers keep their values.

    The first rule that applies, in this order, draws from one generator seeded with ``seed``:

    1. ``special(key, tensor, generator)``, when given and it returns a tensor;
    2. BatchNorm running variances: U(0.5, 2);
    3. running means and biases (keys ending in "bias"): N(0, 0.1^2);
    4. other 1-D tensors (norm weights): U(0.5, 1.5);
    5. the rest (matrices, convolutions, embeddings): ``matrices="noise"``: the current value
       times (1 + N(0, 0.1^2)) (keeps the initialisation's scale); ``"fresh"``:
       N(0, 1 / fan_in) with fan_in the product of the dimensions after the first.

    Args:
        model (nn.Module): the official model (its state dict gives names, shapes, values).
        seed (int): seed of the private generator.
        matrices (str): "noise" or "fresh" (rule 5).
        special (callable, optional): per-key values that override the rules.
    """
    if matrices not in ("noise", "fresh"):
        raise ValueError(f"matrices must be 'noise' or 'fresh', got {matrices!r}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        new = special(k, v, g) if special is not None else None
        if new is not None:
            pass
        elif k.endswith("running_var"):
            new = torch.rand(v.shape, generator=g) * 1.5 + 0.5
        elif k.endswith("running_mean") or k.endswith("bias"):
            new = torch.randn(v.shape, generator=g) * 0.1
        elif v.dim() == 1:  # norm weights
            new = torch.rand(v.shape, generator=g) + 0.5
        elif matrices == "noise":
            new = v * (1 + 0.1 * torch.randn(v.shape, generator=g))
        else:
            fan_in = 1
            for d in v.shape[1:]:
                fan_in *= d
            new = torch.randn(v.shape, generator=g) / float(fan_in) ** 0.5
        out[k] = new.to(v.dtype)
    model.load_state_dict(out, strict=True)
    return out


@dataclass
class Row:
    """One compared quantity.

    Attributes:
        name (str): what was compared (with its shape, by convention).
        abs_diff (float): max |ours - official| (for label maps: the fraction of differing pixels).
        ref_max (float): max |official| (1.0 for label maps).
        ok (bool): within tolerance.
        note (str): free text shown after the verdict.
    """

    name: str
    abs_diff: float
    ref_max: float
    ok: bool
    note: str = ""

    @property
    def rel_diff(self) -> float:
        return self.abs_diff / max(self.ref_max, 1e-12)


@dataclass
class Report:
    """Rows of one comparison, plus timings (seconds) and an optional title."""

    rows: List[Row] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    model: str = ""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def failed(self) -> List[Row]:
        return [r for r in self.rows if not r.ok]

    def row(self, name: str) -> Row:
        """The row called ``name``, else the first whose name starts with it.

        Raises:
            KeyError: no row matches.
        """
        for r in self.rows:
            if r.name == name:
                return r
        for r in self.rows:
            if r.name.startswith(name):
                return r
        raise KeyError(f"no comparison row named {name!r}; rows: {[r.name for r in self.rows]}")

    def format(self) -> str:
        width = max([len(r.name) for r in self.rows] + [4])
        lines = [f"== {self.model}"] if self.model else []
        lines.append(f"{'row':<{width}} {'max|diff|':>11} {'max|official|':>13} {'rel':>10}  ok")
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}} {r.abs_diff:11.3e} {r.ref_max:13.3e} {r.rel_diff:10.2e}  "
                f"{'yes' if r.ok else 'NO'}{'  ' + r.note if r.note else ''}"
            )
        lines += [f"time {k}: {v:.1f} s" for k, v in self.timings.items()]
        return "\n".join(lines)
