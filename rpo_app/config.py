"""Where things live on disk, and the app's settings."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR_ENV = "RPO_APP_DATA_DIR"
DEFAULT_DATA_DIR = "data"
# Names the user gives (adapters, runs) become folder names: keep them to a safe
# alphabet so no name can climb out of the data dir.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def resolve_data_dir(value: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $RPO_APP_DATA_DIR, else ./data."""
    raw = value or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    path = Path(raw).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_name(name: str, what: str = "name") -> str:
    """Refuse names that could escape a folder or surprise a shell."""
    name = (name or "").strip()
    if not _SAFE_NAME.match(name) or name in {".", ".."} or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no '..' and no slashes"
        )
    return name


@dataclass
class DataLayout:
    """The folders under one data dir."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "rpo.sqlite3"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / check_name(run_id, "run id")

    def adapter_dir(self, name: str) -> Path:
        return self.adapters / check_name(name, "adapter name")


@dataclass
class ServeConfig:
    data_dir: Path
    model: str | None = None
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    auth: list[tuple[str, str]] = field(default_factory=list)
    trust_remote_code: bool = False
