"""The configs shipped inside the package: ``preset:NAME`` names one of them wherever a config path is accepted.

The TOML files live in ``ormo/configs/`` (the repository's ``configs/`` is a link to that folder), so an installed
wheel carries them and ``ormo train preset:quickstart`` works from any directory::

    ormo presets                                   every preset with its one-line description
    ormo train preset:quickstart
    ormo sweep preset:ormo/table1_cifar10 --out runs/t1
    ormo.experiment.load_config("preset:orlomo/table3_extreme_delay.toml")

A preset's name is its path under ``ormo/configs/`` with ``/`` separators; the ``.toml`` suffix is optional.
"""

from __future__ import annotations

from pathlib import Path

from .rules.base import ConfigError

PREFIX = "preset:"
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """Every preset's name (``quickstart``, ``ormo/table1_cifar10``, ...), sorted."""
    return sorted(p.relative_to(PRESETS_DIR).with_suffix("").as_posix() for p in PRESETS_DIR.rglob("*.toml"))


def is_preset(path: str | Path) -> bool:
    """Whether ``path`` is a ``preset:NAME`` reference rather than a file path."""
    return str(path).startswith(PREFIX)


def preset_path(name: str) -> Path:
    """The packaged file of ``preset:NAME`` (or of ``NAME``); an unknown name is a ConfigError listing them all."""
    stem = name[len(PREFIX):] if name.startswith(PREFIX) else name
    stem = stem.strip().removesuffix(".toml")
    names = preset_names()
    if stem not in names:  # also rejects "../x" and absolute paths: only the listed files are presets
        raise ConfigError(f"unknown preset {stem!r}; the presets are: {', '.join(names)} "
                          f"(`ormo presets` describes them; a file path without 'preset:' is read as a file)")
    return PRESETS_DIR / f"{stem}.toml"


def preset_description(name: str) -> str:
    """The preset's one-line description: the first comment line of its file, without the ``#``."""
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return ""
