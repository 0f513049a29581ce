"""Where things live on disk, and the app's settings."""
from __future__ import annotations

import dataclasses
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


TEAM_SETTINGS_KEY = "team"


@dataclass
class TeamSettings:
    """How the label queue shares work among annotators; kept in the store, so every
    process and every user of one data dir sees the same."""

    overlap: int = 1  # annotators who judge each item
    gold_rate: float = 0.1  # share of items that are gold checks, while any is left
    recheck_rate: float = 0.0  # share of items re-shown to their own judge, sides swapped
    rank_size: int = 4  # answers per ranking item (rpo_app.rankings: 3 to 6)

    def validate(self) -> "TeamSettings":
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) \
                or not 1 <= self.overlap <= 10:
            raise ValueError(f"overlap (annotators per item) is a whole number from 1 to 10, "
                             f"got {self.overlap!r}")
        from rpo_app.rankings import MAX_ANSWERS, MIN_ANSWERS

        if isinstance(self.rank_size, bool) or not isinstance(self.rank_size, int) \
                or not MIN_ANSWERS <= self.rank_size <= MAX_ANSWERS:
            raise ValueError(f"answers per ranking is a whole number from {MIN_ANSWERS} to "
                             f"{MAX_ANSWERS}, got {self.rank_size!r}")
        for name in ("gold_rate", "recheck_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value <= 0.5:
                raise ValueError(f"{name.replace('_', ' ')} is a share from 0 to 0.5, "
                                 f"got {value!r}")
        return self

    @classmethod
    def load(cls, store) -> "TeamSettings":
        saved = store.setting(TEAM_SETTINGS_KEY) or {}
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, store, by: str | None = None) -> "TeamSettings":
        self.validate()
        store.put_setting(TEAM_SETTINGS_KEY, dataclasses.asdict(self), by)
        return self
