"""Tables that fit the terminal without ever cutting an id.

rich shrinks a table that is too wide by cutting cells (`46a58a0c62…`), ids and addresses
included, which makes them useless to copy. A `FitTable` instead, at render time, first
leaves out its optional columns (least needed first) until the rest fits, then lets the
remaining ordinary columns wrap; its `keep` columns (ids, addresses) are never cut, wrapped
or shrunk: when even they do not fit, the lines are left longer than the terminal.
`wide` (`-o wide`) shows every column. Off a terminal (`render.make_console`) the width is
unbounded, so pipes always get every column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

__all__ = ["FitTable"]

_GAP = 2  # rich's padding between two columns of a box-less table
_FOLDED = 6  # the narrowest an ordinary column is folded to before kept ones get room
_FOLD_BEFORE_DROP = 24  # a long name is folded to this before columns are left out


class FitTable:
    def __init__(
        self,
        headers: Sequence[str],
        *,
        keep: Iterable[str] = ("ID",),
        optional: Sequence[str] = (),
        wide: bool = False,
        header: bool = True,
    ):
        self.headers = list(headers)
        self.keep = set(keep) & set(self.headers)
        unknown = [h for h in optional if h not in self.headers]
        if unknown:
            raise ValueError(f"optional columns not in the table: {unknown}")
        self.optional = list(optional)
        self.wide = wide
        self.header = header
        self.rows: list[list[str]] = []
        # Least widths per header, so rows printed later line up under an earlier table.
        self.min_widths: dict[str, int] = {}

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"{len(cells)} cells for {len(self.headers)} columns")
        self.rows.append(list(cells))

    def _natural(self, i: int) -> int:
        cells = [cell_len(self.headers[i])] + [cell_len(r[i]) for r in self.rows]
        return max(cells + [self.min_widths.get(self.headers[i], 0)])

    def natural_widths(self) -> dict[str, int]:
        """Each column's unwrapped width (for `min_widths` of a later table)."""
        return {h: self._natural(i) for i, h in enumerate(self.headers)}

    def _width(self, shown: Sequence[int], *, folded: int | None = None) -> int:
        """The width of columns `shown`, ordinary ones folded to at most `folded`."""
        return sum(
            self._natural(i) if folded is None or self.headers[i] in self.keep
            else min(self._natural(i), folded)
            for i in shown
        ) + _GAP * (len(shown) - 1)

    def columns_for(self, max_width: int) -> list[str]:
        """The headers shown at `max_width` columns."""
        shown = list(range(len(self.headers)))
        if not self.wide:
            for name in self.optional:
                if self._width(shown, folded=_FOLD_BEFORE_DROP) <= max_width:
                    break
                shown.remove(self.headers.index(name))
        return [self.headers[i] for i in shown]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        names = self.columns_for(options.max_width)
        shown = [self.headers.index(n) for n in names]
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold",
                      show_header=self.header)
        for i in shown:
            if self.headers[i] in self.keep:
                width = self._natural(i)
                table.add_column(self.headers[i], no_wrap=True, min_width=width, max_width=width)
            else:
                table.add_column(self.headers[i], overflow="fold",
                                 min_width=self.min_widths.get(self.headers[i]))
        for row in self.rows:
            table.add_row(*(Text(row[i]) for i in shown))
        # rich's last resort, when wrapping is not enough, cuts every column alike: give it
        # the room the kept columns need instead (printed uncropped, `render.emit`, the
        # terminal then wraps the long lines). -o wide never folds: one line per row.
        need = self._width(shown, folded=None if self.wide else _FOLDED)
        yield from console.render(table, options.update(width=max(options.max_width, need)))
