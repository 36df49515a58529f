"""Reports of the numerical comparisons with official implementations (``tools/compare_with_official_*``).

A :class:`Report` holds one :class:`Row` per compared quantity: the largest absolute difference
between ours and the official output, the largest absolute official value (the scale the
tolerance is relative to), whether the row is within its tolerance, and a note.
"""

from dataclasses import dataclass, field
from typing import Dict, List

__all__ = ["Report", "Row"]


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
