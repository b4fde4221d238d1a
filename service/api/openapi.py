"""Write the API's OpenAPI document to ``openapi/openapi.json`` (``python -m service.api.openapi``).

A test fails when the committed file differs from what the app generates.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def generate() -> dict[str, Any]:
    """The app's schema, built with throwaway settings (nothing is created or connected)."""
    from ..core.settings import Settings
    from .app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        return create_app(Settings(data_dir=Path(tmp), database_url="postgresql+psycopg://openapi@/none")).openapi()


def render() -> str:
    return json.dumps(generate(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv == ["--check"]:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale; run python -m service.api.openapi", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
