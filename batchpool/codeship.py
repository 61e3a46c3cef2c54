"""Ship the user's own code to workers by value: they need only batchpool and installed packages.

A remote worker has batchpool and the user's installed dependencies, but not the
source files of the user's project. So functions and classes that come from
``__main__`` or from *user modules* (see ``is_user_module``) are pickled by value,
and everything from the standard library and installed packages stays pickled by
reference. batchpool itself is never shipped by value, even from a source checkout:
every worker has it.

Which modules get shipped
-------------------------
``ship_user_code`` does not try to find, object by object, which user functions a
call can reach: a user function may hide anywhere (in a ``functools.partial``, a
closure, a default argument, a callback held by an instance of an installed
class, a list nested in the arguments). Any walk that misses one ships a call
that fails on the worker with ``ModuleNotFoundError``. Instead, every user
module that is imported in this process (every entry of ``sys.modules``) is
marked to pickle by value, the first time it is seen. Marking costs nothing
for code that is never pickled, and objects from a module that is not imported
cannot be reached. ``sys.modules`` is looked at again only when its size
changed since the last look; the function and the top level of its arguments
are also checked directly (one dict lookup each), which covers the rare case of
a module replaced by another without a change of size.

Per submit, an already-decided state costs a dict lookup for the serializer, a
``len(sys.modules)`` and one dict lookup per root (and per item of a root that
is a tuple, list or dict, up to ``SHALLOW_ITEMS`` of them).

cloudpickle
-----------
``cloudpickle.register_pickle_by_value(module)`` is cloudpickle's own mechanism.
cloudpickle treats every submodule of a registered module as registered (it
checks the dotted parents of an object's ``__module__``), so the *package root*
is registered: the topmost ancestor package that is itself a user module, with
every package between it and the module a user module too. That keeps a
namespace package shared with installed distributions (``mycompany.installed``
next to ``mycompany.project``) from being registered as a whole. An instance of
a shipped class that a worker returns comes back as an instance of the client's
own class (cloudpickle tracks classes pickled by value).

A module object referenced as a global (``from mypkg import helpers``, or the
``mypkg`` that ``import mypkg.sub`` binds) is pickled by value with its whole
namespace. cloudpickle's own reducer puts that namespace in the module's
constructor arguments, so modules that refer to each other (a package and a
submodule that imports it: the package holds the submodule as an attribute)
recurse until ``RecursionError``. For the packages batchpool registers, a
module is saved as ``types.ModuleType(name)`` with its namespace as the pickle's
state instead (memoized first, so cycles are fine), through cloudpickle's
private dispatch table; every other module is left to cloudpickle. Loading it
needs only the standard library.

dill
----
dill has no per-module switch (its ``byref``/``recurse`` settings apply to
everything; uqfoundation/dill#424, asking for one, is open). dill decides in
one place, ``dill._dill._locate_function(obj, pickler)``: a function or class
whose module can be imported and holds it under its qualified name is pickled
by reference (``F2``/``T4``), anything else by value (``F1``/``T2``); ``__main__``
is always by value. So the first ``ship_user_code("dill", ...)`` wraps that
function once, process-wide: for objects whose ``__module__`` is (in) a shipped
package it answers "not locatable", for all others it defers to dill. Module
objects of shipped packages get a saver (through dill's public ``dill.register``)
that pickles them by value as above; other modules go to dill's own saver.
Limits of the dill route:

- It wraps a private dill function. When a future dill lacks it, a
  ``RuntimeWarning`` says so once, and user code is pickled as dill alone does.
- Globals are shipped only with ``recurse=True`` (batchpool's dill serializer
  uses it): without it dill pickles a by-value function's globals as a reference
  to its module's ``__dict__``, which the worker cannot import.
- An instance of a shipped class that a worker returns is an instance of a
  rebuilt copy of the class, not of the client's class (``isinstance`` with the
  client's class is False; attributes and methods are intact). dill has no class
  tracking like cloudpickle's.

Shared limits
-------------
- What is a user module is decided by where its file is (see ``is_user_module``).
  Editable installs (``pip install -e``) of a project live in its source tree and
  are shipped, which is what a project installed editable for development needs;
  a third-party library installed editable is shipped too (it works, it is just
  bigger). A library put on ``sys.path`` from a folder that is not a
  ``site-packages``/``dist-packages`` folder counts as user code.
- Pickling by value pickles the module-level globals a function uses, at the
  time of the submit. A function that uses a module-level lock, open file or
  connection cannot be pickled by value, where it could by reference.
- Compiled extension modules of the project cannot be shipped (there is no
  Python code to pickle); they stay by reference and must be installed on workers.
- Registration is process-wide (cloudpickle's registry and dispatch table,
  dill's hook): pickling with them in this process for other purposes (another
  framework using cloudpickle) ships user code by value too.
- A module that leaves ``sys.modules`` while another enters between two submits
  (same size) is not seen by the sweep; the function's own module and its
  arguments' classes are still checked directly.
"""

from __future__ import annotations

import abc
import functools
import importlib.machinery
import os
import sys
import sysconfig
import threading
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["SHALLOW_ITEMS", "is_user_module", "prepare_worker", "ship_user_code"]

#: How many items of a root that is a tuple, list or dict are checked directly.
SHALLOW_ITEMS = 16

_NEVER_SHIPPED = "batchpool"
_INSTALL_FOLDERS = frozenset({"site-packages", "dist-packages"})
_NOT_FILES = frozenset({"built-in", "frozen"})
_ROOT_CONTAINERS = (tuple, list)


# -- which modules are the user's ---------------------------------------------------------


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


@functools.cache
def _stdlib_folders() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib") if paths.get(key)}
    folders |= {os.path.realpath(folder) for folder in folders}
    return tuple(sorted({_norm(folder) for folder in folders}))


@functools.cache
def _prefixes() -> tuple[str, ...]:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes |= {os.path.realpath(prefix) for prefix in prefixes}
    return tuple(sorted({_norm(prefix) for prefix in prefixes}))


def _under(path: str, folders: Iterable[str]) -> bool:
    return any(
        path == folder or path.startswith(folder.rstrip(os.sep) + os.sep) for folder in folders
    )


def _is_installed_path(path: str, top_name: str) -> bool:
    """True for a file or folder of the standard library or of an installed distribution."""
    parts = path.split(os.sep)
    if _INSTALL_FOLDERS.intersection(parts) or any(part.endswith(".egg") for part in parts):
        return True
    if _under(path, _stdlib_folders()):
        return True
    # A standard library kept elsewhere under the interpreter's prefix (a zip, a
    # framework build); a user's file that merely shares a stdlib name is not caught.
    return top_name in sys.stdlib_module_names and _under(path, _prefixes())


def _is_user_location(location: str, top_name: str) -> bool:
    if location.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return False  # compiled code cannot be pickled by value
    path = _norm(location)
    if _is_installed_path(path, top_name):
        return False
    real = os.path.normcase(os.path.realpath(location))
    return real == path or not _is_installed_path(real, top_name)


def _locations(module: types.ModuleType) -> list[str]:
    found: list[str] = []
    file = getattr(module, "__file__", None)
    if isinstance(file, str) and file:
        found.append(file)
    path = getattr(module, "__path__", None)
    if path is not None:
        try:
            found.extend(entry for entry in list(path) if isinstance(entry, str) and entry)
        except Exception:  # a broken custom __path__: not ours to judge
            return []
    return found


def is_user_module(module: types.ModuleType) -> bool:
    """True for the user's own source modules (and ``__main__``); False for the standard
    library, installed packages, built-in and frozen modules, and batchpool.

    A module is the user's when its file (and, for a package, every folder of its
    ``__path__``) is Python source outside the standard library and outside any
    ``site-packages``/``dist-packages`` folder: the project's source files, a
    source folder put on ``sys.path``, a project installed editable. A module
    without any file (built in, frozen, made at run time) is not. ``__main__`` is
    the user's when it is a script, ``-c`` code or an interactive session; when it
    was started with ``python -m NAME`` it is judged as the module ``NAME``
    (``python -m pytest`` is not user code, ``python -m myproject.cli`` is).
    """
    if not isinstance(module, types.ModuleType):
        return False
    name = getattr(module, "__name__", None)
    if not isinstance(name, str):
        return False
    spec = getattr(module, "__spec__", None)
    if name == "__main__":
        spec_name = getattr(spec, "name", None)
        if not isinstance(spec_name, str):
            return True
        name = spec_name
    if name == _NEVER_SHIPPED or name.startswith(_NEVER_SHIPPED + "."):
        return False
    if name in sys.builtin_module_names or getattr(spec, "origin", None) in _NOT_FILES:
        return False
    locations = _locations(module)
    if not locations:
        return False
    top_name = name.partition(".")[0]
    return all(_is_user_location(location, top_name) for location in locations)


# -- what is registered -------------------------------------------------------------------

_lock = threading.RLock()
#: Module name -> the package registered for it, or None when it is pickled by reference.
_package_of: dict[str, str | None] = {}
#: Module name -> is_user_module, for the ancestors looked at while finding packages.
_user: dict[str, bool] = {}
#: Every package root found so far; each shipper registers all of them.
_packages: set[str] = set()
#: Names decided while not in sys.modules (an object's ``__module__``): decided again
#: by the sweep that finds them imported.
_absent: set[str] = set()


class _Shipper:
    """One serializer's side: how a package is registered with it, and what already is."""

    def __init__(self, name: str, register: Callable[[types.ModuleType], None]) -> None:
        self.name = name
        self.register = register
        self.registered: set[str] = set()
        #: len(sys.modules) when the last sweep ended; -1 forces the first sweep.
        self.modules_seen = -1


_shippers: dict[str, _Shipper] = {}


def _user_by_name(name: str, modules: dict[str, Any]) -> bool:
    decided = _user.get(name)
    if decided is None:
        module = modules.get(name)
        if module is None:
            return False  # not remembered: it may be imported later
        decided = _user[name] = (
            isinstance(module, types.ModuleType)
            and getattr(module, "__name__", None) == name
            and is_user_module(module)
        )
    return decided


def _package_root(name: str, modules: dict[str, Any]) -> str | None:
    """The package to register so that module ``name`` is pickled by value, or None."""
    if name == "__main__" or not _user_by_name(name, modules):
        # __main__ is pickled by value by both serializers anyway; an aliased entry
        # is decided under its real name. (``__mp_main__``, a script re-run by a
        # multiprocessing child, is pickled by reference: it is registered.)
        return None
    root = name
    while "." in root:
        parent = root.rpartition(".")[0]
        if not _user_by_name(parent, modules):
            break
        root = parent
    return root


def _decide(names: Iterable[str], modules: dict[str, Any]) -> None:
    for name in names:
        if name in modules:
            _absent.discard(name)
        else:
            _absent.add(name)
        root = _package_of[name] = _package_root(name, modules)
        if root is not None:
            _packages.add(root)


def _register_all(shipper: _Shipper, modules: dict[str, Any]) -> None:
    for root in _packages - shipper.registered:
        module = modules.get(root)
        if module is None:
            module = sys.modules.get(root)
        if module is None or root == _NEVER_SHIPPED or root.startswith(_NEVER_SHIPPED + "."):
            continue
        try:
            shipper.register(module)
        except ValueError:  # the package left sys.modules meanwhile; it is tried again later
            continue
        shipper.registered.add(root)


def _sweep(shipper: _Shipper) -> None:
    """Decide every module of ``sys.modules`` not decided yet; register new packages."""
    with _lock:
        modules = sys.modules.copy()
        if len(modules) == shipper.modules_seen and not (_packages - shipper.registered):
            return  # another thread swept while this one waited
        _decide((modules.keys() - _package_of.keys()) | (_absent & modules.keys()), modules)
        _register_all(shipper, modules)
        # Only now: a submit that sees an unchanged size must find everything registered.
        shipper.modules_seen = len(modules)


def _late(name: str, shipper: _Shipper) -> None:
    """Decide one module the sweep did not see (named by an object's ``__module__``)."""
    with _lock:
        if name not in _package_of:
            modules = sys.modules.copy()
            _decide([name], modules)
        if _packages - shipper.registered:
            _register_all(shipper, sys.modules.copy())


def _check(obj: Any, shipper: _Shipper) -> None:
    """Make sure the modules of ``obj`` (its own, for a function or class, and its type's)
    are decided: one dict lookup each once they are."""
    name: Any = type(obj).__module__
    if isinstance(name, str) and name not in _package_of:
        _late(name, shipper)
    if isinstance(obj, (type, types.FunctionType)):
        name = getattr(obj, "__module__", None)
        if isinstance(name, str) and name not in _package_of:
            _late(name, shipper)


def ship_user_code(serializer_name: str, roots: Iterable[Any]) -> None:
    """Before pickling ``roots`` (the function and the call arguments) with serializer
    ``serializer_name`` (``"cloudpickle"`` or ``"dill"``), arrange that every function
    and class defined in a user module that is reachable from them is pickled by value.

    Every user module imported in this process is registered with the serializer
    (its package root, once), so user code is shipped wherever it hides in the
    call; see the module's documentation for why, and for the limits with dill.
    Cheap when called for every submit: after the first call it costs a few dict
    lookups until new modules are imported.
    """
    shipper = _shippers.get(serializer_name)
    if shipper is None:
        shipper = _make_shipper(serializer_name)
    if len(sys.modules) != shipper.modules_seen:
        _sweep(shipper)
    for root in roots:
        _check(root, shipper)
        if isinstance(root, _ROOT_CONTAINERS):
            for item in root[:SHALLOW_ITEMS]:
                _check(item, shipper)
        elif isinstance(root, dict):
            for count, item in enumerate(root.values()):
                if count == SHALLOW_ITEMS:
                    break
                _check(item, shipper)


def prepare_worker(serializer_name: str) -> None:
    """Let a worker pickle results that hold shipped code (a class that arrived by
    value, whose module refers back to it) without recursing forever."""
    with _lock:
        hook = _hooks.get(serializer_name)
        if hook is None:
            hook = _hooks[serializer_name] = _HOOKS[serializer_name]()
        hook.install()


#: In a worker: per module, the globals that functions of it pickled by value brought.
_namespaces: dict[str, dict[str, Any]] = {}


def share_globals(fn: Any) -> None:
    """In a worker: make a function that arrived by value use its module's globals as
    this process first received them.

    Each pickle of a function by value carries its own copy of the module globals it
    uses, so an initializer that fills a module-level dict of the user's script
    (``cache["model"] = load()``) would fill a copy the calls never see. A module
    imported once has one namespace per process: so the globals here are taken from
    the first function of that module that arrived, and new names are added to it.
    (Rebinding a global, ``global n; n += 1``, still changes only one function's copy.)
    """
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    namespace = getattr(fn, "__globals__", None)
    if not isinstance(namespace, dict):
        return
    module_name = namespace.get("__name__") or getattr(fn, "__module__", None)
    if not isinstance(module_name, str):
        return
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__dict__", None) is namespace:
        return  # imported by reference: the real module's globals
    shared = _namespaces.setdefault(module_name, {})
    for name, value in list(namespace.items()):
        if name.startswith("__"):
            continue
        if name in shared:
            namespace[name] = shared[name]
        else:
            shared[name] = value


def _make_shipper(serializer_name: str) -> _Shipper:
    with _lock:
        shipper = _shippers.get(serializer_name)
        if shipper is not None:
            return shipper
        hook_class = _HOOKS.get(serializer_name)
        if hook_class is None:
            raise ValueError(
                f"serializer={serializer_name!r}: batchpool ships user code for "
                f"{' and '.join(map(repr, _HOOKS))} only"
            )
        hook = _hooks.get(serializer_name)
        if hook is None:
            hook = _hooks[serializer_name] = hook_class()
        hook.install()  # now, so that a serializer that is not installed is reported here
        shipper = _shippers[serializer_name] = _Shipper(serializer_name, hook.register)
        return shipper


# -- the serializers' sides ---------------------------------------------------------------

_MODULE_STATE_DROPPED = ("__builtins__", "__loader__", "__spec__")


def _module_reduction(module: types.ModuleType) -> tuple[Any, ...]:
    """A module of a shipped package, by value: ``ModuleType(name)``, then its namespace.

    The namespace is the pickle's *state*, saved after the new module is memoized,
    so modules that refer to each other (a package and a submodule that imports it)
    do not recurse forever. The loader, the spec and the builtins stay behind:
    they describe this machine's files. The rebuilt module is not put in the
    worker's ``sys.modules``. Only the standard library is needed to load it.
    """
    state = module.__dict__.copy()
    for key in _MODULE_STATE_DROPPED:
        state.pop(key, None)
    return types.ModuleType, (module.__name__,), state


class _Hook(abc.ABC):
    """What a serializer needs so that the packages registered with it go by value."""

    serializer = ""

    def __init__(self) -> None:
        self.packages: set[str] = set()
        self._answers: dict[str, bool] = {}
        self.installed = False

    def by_value(self, module_name: str) -> bool:
        """Whether objects of module ``module_name`` are shipped (one dict lookup when known)."""
        answer = self._answers.get(module_name)
        if answer is None:
            name = module_name
            answer = name in self.packages
            while not answer and "." in name:
                name = name.rpartition(".")[0]
                answer = name in self.packages
            self._answers[module_name] = answer
        return answer

    def register(self, module: types.ModuleType) -> None:
        self.packages.add(module.__name__)
        self._answers.clear()

    def saves_by_value(self, module: Any) -> bool:
        """Whether ``module`` is saved with ``_module_reduction``: a module of a shipped
        package, or one that arrived by value (on a worker: not in ``sys.modules``),
        whose functions and classes refer back to it when results are pickled."""
        name = getattr(module, "__name__", None)
        return type(name) is str and (self.by_value(name) or name not in sys.modules)

    def install(self) -> None:
        if not self.installed:
            self._install()
            self.installed = True

    @abc.abstractmethod
    def _install(self) -> None:
        """Hook this serializer: called once, on first use."""

    def uninstall(self) -> None:
        self.packages.clear()
        self._answers.clear()
        self.installed = False

    def _cannot(self, version: str, missing: str, consequence: str) -> None:
        warnings.warn(
            f"batchpool cannot fully ship user code by value with {self.serializer} {version}: "
            f"{missing} is gone; {consequence}",
            RuntimeWarning,
            stacklevel=5,
        )


class _CloudpickleHook(_Hook):
    """``cloudpickle.register_pickle_by_value``, and a module reducer that allows cycles.

    cloudpickle's own reducer of a module pickled by value puts the module's
    namespace in the arguments of its constructor, so a package whose submodule
    refers to the package (``import mypkg.sub`` binds ``mypkg``) recurses until
    ``RecursionError``. For the packages batchpool registers, the module is saved
    with ``_module_reduction`` instead (through cloudpickle's private dispatch
    table); every other module is left to cloudpickle.
    """

    serializer = "cloudpickle"

    def __init__(self) -> None:
        super().__init__()
        self._table: dict[Any, Any] | None = None
        self._original: Callable[[types.ModuleType], Any] | None = None

    def register(self, module: types.ModuleType) -> None:
        import cloudpickle

        # Looked up at each call, not bound at import: the public API, as documented.
        cloudpickle.register_pickle_by_value(module)
        super().register(module)

    def _install(self) -> None:
        import cloudpickle
        import cloudpickle.cloudpickle as impl

        table = getattr(getattr(impl, "Pickler", None), "_dispatch_table", None)
        original = table.get(types.ModuleType) if isinstance(table, dict) else None
        if table is None or not callable(original):
            self._cannot(
                cloudpickle.__version__,
                "cloudpickle.cloudpickle.Pickler._dispatch_table",
                "user modules that refer to each other may fail to pickle (RecursionError)",
            )
            return
        hook = self

        def reduce_module(module: types.ModuleType) -> Any:
            if hook.saves_by_value(module):
                return _module_reduction(module)
            return original(module)

        table[types.ModuleType] = reduce_module
        self._table, self._original = table, original

    def uninstall(self) -> None:
        import cloudpickle

        registry = cloudpickle.list_registry_pickle_by_value()
        for name in self.packages & registry:
            module = sys.modules.get(name)
            if module is not None and getattr(module, "__name__", None) == name:
                cloudpickle.unregister_pickle_by_value(module)
            else:  # gone from sys.modules, or another module (an alias) under its name
                cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES.discard(name)
        if self._table is not None:
            self._table[types.ModuleType] = self._original
            self._table = self._original = None
        super().uninstall()


class _DillHook(_Hook):
    """A wrap of dill's ``_locate_function`` and a saver of modules (see the module's docs)."""

    serializer = "dill"

    def __init__(self) -> None:
        super().__init__()
        self._impl: Any = None
        self._original_locate: Callable[..., Any] | None = None
        self._original_save_module: Callable[..., Any] | None = None

    def _install(self) -> None:
        import dill
        import dill._dill as impl

        original_locate = getattr(impl, "_locate_function", None)
        original_save_module = impl.Pickler.dispatch.get(types.ModuleType)
        if not callable(original_locate) or not callable(original_save_module):
            self._cannot(
                dill.__version__,
                "dill._dill._locate_function",
                "functions of your own modules are pickled by reference and must be "
                "importable on workers (serializer='cloudpickle' ships them)",
            )
            return
        hook = self

        def _locate_function(obj: Any, pickler: Any = None) -> bool:
            module_name = getattr(obj, "__module__", None)
            if type(module_name) is str and hook.by_value(module_name):
                return False  # "cannot be found by name": dill pickles it by value
            return bool(original_locate(obj, pickler))

        def save_module(pickler: Any, obj: types.ModuleType) -> None:
            if hook.saves_by_value(obj):
                constructor, args, state = _module_reduction(obj)
                pickler.save_reduce(constructor, args, obj=obj, state=state)
            else:
                original_save_module(pickler, obj)

        impl._locate_function = _locate_function
        dill.register(types.ModuleType)(save_module)
        self._impl = impl
        self._original_locate = original_locate
        self._original_save_module = original_save_module

    def uninstall(self) -> None:
        if self._impl is not None:
            self._impl._locate_function = self._original_locate
            self._impl.Pickler.dispatch[types.ModuleType] = self._original_save_module
            self._impl = self._original_locate = self._original_save_module = None
        super().uninstall()


_HOOKS: dict[str, type[_Hook]] = {"cloudpickle": _CloudpickleHook, "dill": _DillHook}
_hooks: dict[str, _Hook] = {}


# -- for tests ----------------------------------------------------------------------------


def _forget() -> None:
    """Undo everything this module did in this process: registrations, hooks, decisions."""
    with _lock:
        try:
            for hook in _hooks.values():
                hook.uninstall()
        finally:
            _hooks.clear()
            _shippers.clear()
            _package_of.clear()
            _user.clear()
            _packages.clear()
            _absent.clear()
