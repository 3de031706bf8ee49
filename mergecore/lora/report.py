"""The per-tensor table an adapter-writing command returns, prints and saves as CSV
(extract-lora's extract_report.csv, merge-adapters' merge_report.csv): one shape for both."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Row:
    """One tensor of the adapter: `lora` (factorised; `rank`, `energy`, `error`, `svd`), `full`
    (kept whole in modules_to_save) or `bias` (a factorised layer's bias, peft's bias="lora_only")."""

    tensor: str
    kind: str
    shape: tuple[int, ...]
    rank: Optional[int] = None
    energy: float = 1.0
    error: float = 0.0
    svd: str = ""


def rows_csv(rows: Sequence[Row]) -> str:
    """The rows as CSV, with a header line."""
    lines = ["tensor,kind,shape,rank,retained_energy,relative_error,svd"]
    for row in rows:
        lines.append(f"{row.tensor},{row.kind},{'x'.join(map(str, row.shape))},{row.rank or ''},"
                     f"{row.energy:.6f},{row.error:.6g},{row.svd}")
    return "\n".join(lines) + "\n"


def rows_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table, for the terminal."""
    width = max([len(r.tensor) for r in rows] + [6])
    out = io.StringIO()
    out.write(f"{'tensor':<{width}}  {'kind':<4}  {'rank':>5}  {'energy':>8}  {'rel.err':>9}\n")
    for r in rows:
        out.write(f"{r.tensor:<{width}}  {r.kind:<4}  {r.rank if r.rank else '-':>5}  {r.energy:8.4f}  "
                  f"{r.error:9.3g}\n")
    return out.getvalue().rstrip("\n")


class RowsReport:
    """The table methods both commands' reports share (they are dataclasses with `rows`)."""

    rows: list[Row]

    @property
    def lora(self) -> list[Row]:
        return [row for row in self.rows if row.kind == "lora"]

    def csv(self) -> str:
        return rows_csv(self.rows)

    def table(self) -> str:
        """The rows as an aligned text table, for the terminal."""
        return rows_table(self.rows)

    def rank_span(self) -> str:
        """'rank 8' or 'ranks 4-16' over the factorised rows."""
        ranks = [r.rank or 0 for r in self.lora]
        return f"rank {min(ranks)}" if min(ranks) == max(ranks) else f"ranks {min(ranks)}-{max(ranks)}"

    def energy_text(self) -> str:
        energies = [r.energy for r in self.lora]
        return f"retained energy min {min(energies):.4f} mean {sum(energies) / len(energies):.4f}"
