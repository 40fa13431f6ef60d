"""`lepton-ctl serve predict S --input FILE.npy [-o json]`: rows from a .npy file through any
agent's Predict (lepton.client.predict). Hooked into `serve` by client/cli_serve.py.

Default output: one line per input row (a class, or the row's values separated by spaces);
`-o json` / `-o yaml`: {"predictions": [...]} with one entry per input row.
"""

from __future__ import annotations

import argparse
from typing import Any

from lepton.common.errors import FailedPrecondition, InvalidArgument

from ._cli_common import _client, command, print_result

__all__ = ["register_predict"]


def load_rows(path: str) -> Any:
    """The array in a .npy file (never a pickle). Raises InvalidArgument / FailedPrecondition."""
    import numpy as np

    if not path.endswith(".npy"):
        raise InvalidArgument(f"--input {path}: give a .npy file (numpy.save), one row per prediction")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FailedPrecondition(f"--input {path}: no such file") from None
    except (OSError, ValueError, EOFError) as err:  # EOFError: an empty or cut-short file
        raise InvalidArgument(f"--input {path}: not a numpy array file ({err})") from None
    if array.ndim == 0:
        raise InvalidArgument(f"--input {path}: holds one number; give rows, shape (n, ...)")
    return array


def _line(row: Any) -> str:
    return " ".join(str(v) for v in row) if isinstance(row, list) else str(row)


def cmd_predict(args: argparse.Namespace) -> int:
    rows = load_rows(args.input)
    with _client(args) as c:
        outputs = c.predict(args.name, rows)
    predictions = outputs.tolist()
    return print_result(args, {"predictions": predictions}, "".join(_line(p) + "\n" for p in predictions))


def register_predict(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `predict` to the `serve` subcommands `sub`."""
    p = command(sub, "predict", cmd_predict,
                "predict the rows of a .npy file with deployment NAME (through any agent)", [common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("--input", required=True, metavar="FILE.npy", help="rows to predict, shape (n, ...)")
