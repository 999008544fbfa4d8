"""Load a Python v2-model Functions app and read its functions the way the Python worker does."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func

from sandbox.host.errors import HostStartupError

TRIGGERS = ("queueTrigger", "timerTrigger", "httpTrigger")
OUTPUTS = ("http", "queue")
SCRIPT_FILE_SETTING = "PYTHON_SCRIPT_FILE_NAME"
_PRELOADED: dict[str, set[str]] = {}  # app folder -> the modules imported before the app was first loaded
_ADDED_TO_PATH: set[str] = set()  # app folders load_app put on sys.path (unload_app takes away only those)


@dataclass(frozen=True)
class FunctionSpec:
    """One function: its name, the host's JSON for its bindings, and the Python callable."""

    name: str
    bindings: tuple[dict[str, Any], ...]
    callable: Callable[..., Any]
    script: Path
    accepts_context: bool = False
    is_async: bool = field(default=False)

    @property
    def trigger(self) -> dict[str, Any]:
        return next(b for b in self.bindings if str(b["type"]).endswith("Trigger"))

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return [b for b in self.bindings if str(b.get("direction", "")).upper() == "OUT"]


def _import_error_line(exc: BaseException, script: Path, app_dir: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).is_relative_to(app_dir)]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(script)
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f"{exc.filename}:{exc.lineno}"
    return f"{where}: the app failed to import: {type(exc).__name__}: {exc}"


def load_app(app_dir: Path, script_name: str = "function_app.py") -> list[FunctionSpec]:
    """Import the app's script under a unique module name and return its functions."""
    app_dir = app_dir.resolve()
    script = app_dir / script_name
    if not script.is_file():
        raise HostStartupError(f"{script}: not found (the Python v2 model needs {script_name} in the app folder)")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))  # the worker puts the app root on sys.path, so `import shared` works
        _ADDED_TO_PATH.add(str(app_dir))
    _PRELOADED.setdefault(str(app_dir), set(sys.modules))
    module_name = f"_localhost_app_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, script)
    if spec is None or spec.loader is None:
        raise HostStartupError(f"{script}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # an app that fails to import is a user error: one line, no traceback wall
        sys.modules.pop(module_name, None)
        raise HostStartupError(_import_error_line(exc, script, app_dir)) from exc
    apps = [v for v in vars(module).values() if isinstance(v, func.FunctionRegister)]
    if len(apps) != 1:
        raise HostStartupError(f"{script}: expected exactly one FunctionApp at module level, found {len(apps)}")
    try:
        functions = apps[0].get_functions()  # not idempotent: called once per app object
    except ValueError as exc:
        raise HostStartupError(f"{script}: {exc}") from None
    specs = [_to_spec(f, script) for f in functions]
    if not specs:
        raise HostStartupError(f"{script}: the FunctionApp registers no functions")
    return specs


def _to_spec(function: Any, script: Path) -> FunctionSpec:
    name: str = function.get_function_name()
    bindings = tuple(json.loads(function.get_function_json())["bindings"])
    user_fn: Callable[..., Any] = function.get_user_function()
    where = f"{script}: function {name!r}"
    triggers = [b for b in bindings if str(b["type"]).endswith("Trigger")]
    if len(triggers) != 1:
        raise HostStartupError(f"{where}: needs exactly one trigger, has {len(triggers)}")
    for binding in bindings:
        kind = binding["type"]
        direction = str(binding.get("direction", "")).upper()
        supported = kind in TRIGGERS if kind.endswith("Trigger") else (direction == "OUT" and kind in OUTPUTS)
        if not supported:
            raise HostStartupError(
                f"{where}: binding {binding.get('name')!r} of type {kind!r} ({direction.lower()}) is not "
                f"supported by the local host (supported: triggers {', '.join(TRIGGERS)}; outputs "
                f"{', '.join(OUTPUTS)})"
            )
    params = inspect.signature(user_fn).parameters
    accepts_context = "context" in params
    expected = {b["name"] for b in bindings if b["name"] != "$return"}
    declared = set(params) - {"context"}
    if declared != expected:
        missing = sorted(expected - declared)
        extra = sorted(declared - expected)
        detail = "; ".join(
            part
            for part in (
                f"bindings without a parameter: {', '.join(missing)}" if missing else "",
                f"parameters without a binding: {', '.join(extra)}" if extra else "",
            )
            if part
        )
        raise HostStartupError(f"{where}: parameters and bindings differ ({detail})")
    return FunctionSpec(
        name=name,
        bindings=bindings,
        callable=user_fn,
        script=script,
        accepts_context=accepts_context,
        is_async=inspect.iscoroutinefunction(user_fn),
    )


def _installed_roots() -> list[Path]:
    """Where installed packages live (a virtual environment may sit inside the app folder: `.venv`)."""
    return [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]


def unload_app(app_dir: Path) -> None:
    """Undo what load_app did to the interpreter: the app folder on sys.path and the modules it imported from there.

    Modules that were imported before the app was loaded stay: whoever imported them (a test, the sandbox running
    the host in-process) keeps using the same module objects."""
    app_dir = app_dir.resolve()
    preloaded = _PRELOADED.pop(str(app_dir), set())
    if str(app_dir) in _ADDED_TO_PATH:  # only what load_app put there: an entry the caller had stays
        _ADDED_TO_PATH.discard(str(app_dir))
        while str(app_dir) in sys.path:
            sys.path.remove(str(app_dir))
    for name, module in list(sys.modules.items()):
        if name in preloaded:
            continue
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if path.is_relative_to(app_dir) and not any(path.is_relative_to(p) for p in _installed_roots()):
            del sys.modules[name]
