"""User code by reference: a task's entry (``[task] entry``) and the modules to import first (``[task] imports``).

A module reference is either

* a **module name**, ``mypkg.tasks``: an installed package, or a module in a folder on ``PYTHONPATH``; or
* a **file path** ending in ``.py``, ``examples/my_task.py``: its folder goes first on ``sys.path`` and it is imported
  under its file name (``my_task``), as ``python examples/my_task.py`` would see it. A relative path is read from the
  directory ormo runs in (on a Ray worker: also from the driver's).

An entry adds ``:callable``, e.g. ``mypkg.tasks:make_task`` or ``examples/my_task.py:make_task``: a function or class
called as ``callable(context, **options)`` that returns a task (``ormo.task``). Importing a module runs its
registrations (``ormo.models.register_model``, ``ormo.data.register_dataset``, ``ormo.rules.register``), so configs,
``ormo train``, ``ormo sweep`` and ``ormo rules`` see what it registers.

Every failure is one :class:`ConfigError` line naming the field, the value and what to do. No torch import here: the
config layer resolves entries while it validates.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError

_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: modules imported from a file path: resolved path -> module (the Ray driver ships their code by value)
_FILE_MODULES: dict[str, ModuleType] = {}


def is_file_ref(ref: str) -> bool:
    """Whether a module reference is a file path (``.py`` suffix or a path separator) rather than a module name."""
    return ref.endswith(".py") or "/" in ref or os.sep in ref


def describe_failure(e: BaseException) -> str:
    """``TypeName: message (file:line)`` of an exception raised inside user code (its innermost frame)."""
    if isinstance(e, SyntaxError) and e.filename:  # the compiler's: its innermost frame is importlib's, not the file's
        return f"{type(e).__name__}: {e.msg} ({e.filename}:{e.lineno})"
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _import(name: str, *, field: str, ref: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"{field}: no module named {e.name!r}; install the package, put its folder on "
                              f"PYTHONPATH, or give a file path such as path/to/{name.split('.')[-1]}.py") from None
        raise ConfigError(f"{field}: importing {ref!r} failed: {describe_failure(e)}; fix that import") from None
    except ConfigError as e:  # a registration in the module refused something: its own message says what
        raise ConfigError(f"{field}: importing {ref!r} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises, the report is the same one line
        raise ConfigError(f"{field}: importing {ref!r} failed: {describe_failure(e)}; fix the module") from None
    except SystemExit as e:  # sys.exit() at import: not a finished run (it would exit 0 with nothing written)
        raise ConfigError(f"{field}: importing {ref!r} called sys.exit({e.code!r}); a plugin module must not exit "
                          f"at import: remove that call (or guard it with `if __name__ == \"__main__\":`)") from None


def _import_file(ref: str, *, field: str, base_dir: str | None) -> ModuleType:
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if base_dir is not None and not path.is_absolute():
        candidates.append(Path(base_dir) / path)
    found = next((p for p in candidates if p.is_file()), None)
    folder = next((p for p in candidates if p.is_dir()), None)
    if found is None and folder is not None:
        raise ConfigError(f"{field}: {ref!r} is a folder ({folder}), not a .py file; give the path of a .py file, or a "
                          f"module name with its folder on PYTHONPATH")
    if found is None:
        where = " or ".join(str(p.parent) for p in dict.fromkeys(c for c in candidates))
        raise ConfigError(f"{field}: file {ref!r} does not exist (looked in {where}); give the path of a .py file "
                          f"relative to the directory you run ormo in, or an absolute one")
    found = found.resolve()
    if found.suffix != ".py":
        raise ConfigError(f"{field}: {ref!r} is not a Python file (.py); give a module name or the path of a .py file")
    name = found.stem
    if not name.isidentifier():
        better = re.sub(r"\W", "_", name)
        raise ConfigError(f"{field}: {ref!r} cannot be imported as a module (its name {name!r} is not a Python "
                          f"identifier); rename the file, e.g. {better}.py")
    known = _FILE_MODULES.get(str(found))
    if known is not None:
        return known
    existing = sys.modules.get(name)
    if existing is not None:
        origin = getattr(existing, "__file__", None)
        if origin is None or Path(origin).resolve() != found:
            raise ConfigError(f"{field}: {ref!r} would be imported as module {name!r}, which is already "
                              f"{origin or 'a built-in module'}; rename the file")
    folder = str(found.parent)
    if folder not in sys.path:  # like `python FILE`: the file's folder first, so its own sibling imports work
        sys.path.insert(0, folder)
    module = _import(name, field=field, ref=ref)
    origin = getattr(module, "__file__", None)
    if origin is None or Path(origin).resolve() != found:
        raise ConfigError(f"{field}: {ref!r} would be imported as module {name!r}, which is already "
                          f"{origin or 'a built-in module'}; rename the file")
    _FILE_MODULES[str(found)] = module
    return module


def import_module_ref(ref: Any, *, field: str, base_dir: str | None = None) -> ModuleType:
    """Import a module name or a ``.py`` file path (see the module docstring); a ConfigError names ``field``."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{field}: expected a module name like \"mypkg.tasks\" or a file path like "
                          f"\"path/to/tasks.py\", got {ref!r}")
    ref = ref.strip()
    if is_file_ref(ref):
        return _import_file(ref, field=field, base_dir=base_dir)
    if not _MODULE_NAME.match(ref):
        raise ConfigError(f"{field}: {ref!r} is neither a module name (like mypkg.tasks) nor a .py file path")
    return _import(ref, field=field, ref=ref)


def import_modules(refs: Iterable[str], *, field: str = "task.imports", base_dir: str | None = None) -> None:
    """Import every module of ``refs`` (their registrations run once; Python caches the modules)."""
    for i, ref in enumerate(refs):
        import_module_ref(ref, field=f"{field}[{i}] = {ref!r}", base_dir=base_dir)


def split_entry(entry: Any) -> tuple[str, str]:
    """``"mod:attr"`` -> ``("mod", "attr")``; a ConfigError for anything else."""
    ok = isinstance(entry, str) and ":" in entry
    ref, _, attr = entry.rpartition(":") if ok else ("", "", "")
    if not ok or not ref.strip() or not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(f"task.entry = {entry!r}: expected \"module:callable\" (e.g. \"mypkg.tasks:make_task\") or "
                          f"\"path/to/file.py:callable\"")
    return ref.strip(), attr


def resolve_entry(entry: str, *, base_dir: str | None = None) -> Callable[..., Any]:
    """The callable named by ``entry`` (its module imported)."""
    ref, attr = split_entry(entry)
    field = f"task.entry = {entry!r}"
    module = import_module_ref(ref, field=field, base_dir=base_dir)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            raise ConfigError(f"{field}: module {module.__name__!r} has no attribute {attr!r} (it defines: "
                              f"{', '.join(defined) or 'no public callables'})")
        obj = getattr(obj, part)
    if not callable(obj):
        shown = repr(obj) if len(repr(obj)) <= 40 else f"<a {type(obj).__name__}>"
        raise ConfigError(f"{field}: {module.__name__}.{attr} = {shown} is not a callable; name a function or class "
                          f"that takes (context, **options) and returns a task")
    return obj


def check_options(factory: Callable[..., Any], options: dict[str, Any], *, entry: str) -> None:
    """The entry must accept ``(context, **options)``: an unknown or missing option is one line before anything
    runs."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a callable without a readable signature: its call will say
        return
    try:
        signature.bind(None, **options)
    except TypeError as e:
        raise ConfigError(f"task.options {sorted(options)!r} do not fit task.entry = {entry!r} ({e}); it takes "
                          f"({', '.join(signature.parameters)})") from None


def file_modules() -> list[ModuleType]:
    """The modules imported from file paths so far (Ray pickles their classes by value: a worker process does not
    have the file's folder on its path before it imports the entry itself)."""
    return list(_FILE_MODULES.values())


def task_sources(entry: str | None, imports: Iterable[str], *, base_dir: str | None = None) -> list[dict[str, str]]:
    """The user code a run's task comes from: for the entry's module and every import, the file it was loaded from
    and that file's sha256 (run.json keeps them; a resume or a replay whose code differs is refused)."""
    import hashlib

    refs = [split_entry(entry)[0]] if entry else []
    refs += [r.strip() for r in imports if isinstance(r, str)]
    out = []
    for ref in dict.fromkeys(refs):
        module = import_module_ref(ref, field=f"task source {ref!r}", base_dir=base_dir)
        origin = getattr(module, "__file__", None)
        if origin is None:
            continue
        path = Path(origin).resolve()
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            continue
        out.append({"ref": ref, "file": str(path), "sha256": digest})
    return out


def check_task_sources(recorded: Any, current: list[dict[str, str]], *, what: str) -> None:
    """A ConfigError when the task's code differs from what ``recorded`` (run.json) says the run was made with."""
    if not isinstance(recorded, list):
        return  # a run from before sources were recorded (or image classification)
    now = {c["ref"]: c for c in current}
    for old in recorded:
        if not isinstance(old, dict) or not isinstance(old.get("ref"), str):
            continue
        new = now.get(old["ref"])
        if new is None or new["file"] != old.get("file"):
            raise ConfigError(f"cannot {what}: task code {old['ref']!r} now resolves to "
                              f"{new['file'] if new else 'nothing'}, but the run was made with {old.get('file')}; "
                              f"run ormo from the folder the run was started in (file paths in task.entry and "
                              f"task.imports are relative to it)")
        if new["sha256"] != old.get("sha256"):
            raise ConfigError(f"cannot {what}: {new['file']} changed since the run was made (sha256 "
                              f"{str(old.get('sha256'))[:12]}… then, {new['sha256'][:12]}… now); restore that file, "
                              f"or start a new run")
