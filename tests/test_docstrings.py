"""Every public name of jaxbn has a Google-style docstring.

The modules are found by walking the package (every module whose name has no
component starting with ``_``), so a new module is covered without editing this
file. A module's public names are its ``__all__``; for a class, also the methods
and properties it defines whose names do not start with ``_`` (and ``__call__``).

That every public module, class, function, method and property has a docstring
of its own, in Google style, is ruff's docstring rules (``D``, in
``pyproject.toml``; CI runs them). This test holds what they do not:

- a function or method with parameters has an ``Args:`` section, and one that
  returns a value a ``Returns:`` (or ``Yields:``) section;
- a class whose constructor takes parameters documents them under ``Args:`` or
  ``Attributes:`` (dataclasses and named tuples: their fields);
- a module-level constant is documented by a ``#:`` comment above it (it has no
  ``__doc__`` of its own; the API site shows the comment).

``KNOWN_MISSING`` lists, per module, the problems found when this test was
written: the test fails on any other, and on a listed one that has since been
fixed (remove it from the list then).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import textwrap

import pytest

import jaxbn

# Optional dependencies a module may need; without them the module is skipped.
OPTIONAL = {"flax", "equinox", "torch", "sklearn", "matplotlib", "tqdm"}

KNOWN_MISSING: dict[str, set[str]] = {
    module: {
        f"{module}.BatchNorm.init: returns a value but has no Returns: section",
        f"{module}.BatchNorm.like_torch: returns a value but has no Returns: section",
    }
    for module in ("jaxbn", "jaxbn.layer")
}


def public_modules() -> list[str]:
    """``jaxbn`` and every public module under it."""
    names = ["jaxbn"]
    for info in pkgutil.walk_packages(jaxbn.__path__, "jaxbn."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if (err.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {err.name}, not installed")
        raise


def _own_doc(obj) -> str:
    """The object's own docstring, or '' (generated and inherited ones do not count)."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        if doc.startswith(f"{obj.__name__}("):  # dataclass / namedtuple placeholder
            return ""
        return doc
    return getattr(obj, "__doc__", None) or ""


def _returns_value(func) -> bool:
    """Whether a function returns something: its annotation, else its source."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    ann = sig.return_annotation
    if ann is not inspect.Signature.empty:
        return ann not in (None, "None", type(None))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return False
    body = tree.body[0]

    def visit(node) -> bool:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # a nested function's returns are its own
            value = child.value if isinstance(child, ast.Return) else None
            if value is not None and not (isinstance(value, ast.Constant) and value.value is None):
                return True
            if isinstance(child, (ast.Yield, ast.YieldFrom)) or visit(child):
                return True
        return False

    return visit(body)


def _parameters(func, *, bound: bool) -> list[str]:
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return []
    if bound and params and params[0] in ("self", "cls"):
        params = params[1:]
    return params


def check_function(path: str, func, *, bound: bool = False) -> list[str]:
    """The rules a function or method breaks, as ``"path: what"`` strings."""
    func = inspect.unwrap(func)
    doc = _own_doc(func)
    problems = []
    if _parameters(func, bound=bound) and "Args:" not in doc:
        problems.append(f"{path}: parameters but no Args: section")
    if _returns_value(func) and "Returns:" not in doc and "Yields:" not in doc:
        problems.append(f"{path}: returns a value but has no Returns: section")
    return problems


def check_class(path: str, cls) -> list[str]:
    """The rules a class and its public methods and properties break."""
    doc = _own_doc(cls)
    problems = []
    fields = dataclasses.is_dataclass(cls) or hasattr(cls, "_fields")
    init = cls.__dict__.get("__init__")
    takes_args = fields or (init is not None and _parameters(init, bound=True))
    if takes_args and "Args:" not in doc and "Attributes:" not in doc:
        init_doc = _own_doc(init) if init is not None and not fields else ""
        if "Args:" not in init_doc:
            problems.append(f"{path}: constructor parameters but no Args:/Attributes: section")
    # A dataclass field whose default is a function (an initializer) is an attribute,
    # documented under Attributes:/Args:, not a method.
    field_names = (
        {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    )
    for name, member in vars(cls).items():
        if (name.startswith("_") and name != "__call__") or name in field_names:
            continue
        if isinstance(member, (staticmethod, classmethod)):
            bound = isinstance(member, classmethod)
            problems += check_function(f"{path}.{name}", member.__func__, bound=bound)
        elif inspect.isfunction(member):
            problems += check_function(f"{path}.{name}", member, bound=True)
    return problems


def check_constant(path: str, module, name: str) -> list[str]:
    """A module constant needs a ``#:`` comment right above its assignment."""
    try:
        lines = inspect.getsource(module).splitlines()
    except OSError:
        return [f"{path}: source not found"]
    for i, line in enumerate(lines):
        if line.startswith((f"{name} =", f"{name}:")):
            if i > 0 and lines[i - 1].lstrip().startswith("#:"):
                return []
            return [f"{path}: constant without a #: comment above it"]
    return []  # assigned some other way (an import): documented where it comes from


def check_module(name: str) -> list[str]:
    """Every rule broken by a module and its public names."""
    module = _import(name)
    problems = []
    public = getattr(module, "__all__", None)
    if public is None:
        return [*problems, f"{name}: no __all__ (its public names are undefined)"]
    for attr in public:
        obj = getattr(module, attr)
        path = f"{name}.{attr}"
        if inspect.ismodule(obj):
            continue  # checked as a module of its own
        if inspect.isclass(obj):
            problems += check_class(path, obj)
        elif callable(obj):
            problems += check_function(path, obj)
        else:
            problems += check_constant(path, module, attr)
    return problems


def test_modules_are_found():
    names = public_modules()
    for expected in ("jaxbn", "jaxbn.ops", "jaxbn.reference", "jaxbn.layer", "jaxbn.train"):
        assert expected in names
    assert not any(part.startswith("_") for n in names for part in n.split("."))


@pytest.mark.parametrize("module", public_modules())
def test_public_names_are_documented(module):
    problems = check_module(module)
    known = KNOWN_MISSING.get(module, set())
    new = [p for p in problems if p not in known]
    assert not new, "undocumented public names:\n" + "\n".join(new)
    fixed = sorted(known - set(problems))
    assert not fixed, f"documented now, remove from KNOWN_MISSING[{module!r}]:\n" + "\n".join(fixed)


# The checker itself: each rule catches what it names.


def _documented(x, y):
    """Adds.

    Args:
        x: a number.
        y: a number.

    Returns:
        The sum.
    """
    return x + y


def _no_returns(x):
    """Adds.

    Args:
        x: a number.
    """
    return x + 1


def _no_args(x):
    """Returns one more.

    Returns:
        ``x + 1``.
    """
    return x + 1


def _procedure(x) -> None:
    """Does nothing.

    Args:
        x: ignored.
    """


@dataclasses.dataclass(frozen=True)
class _Config:
    size: int

    def method(self, x):
        return x


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (_documented, []),
        (_no_returns, ["f: returns a value but has no Returns: section"]),
        (_no_args, ["f: parameters but no Args: section"]),
        (_procedure, []),
    ],
    ids=["documented", "no-returns", "no-args", "procedure"],
)
def test_checker_functions(func, expected):
    assert check_function("f", func) == expected


def test_checker_classes():
    assert check_class("C", _Config) == [
        "C: constructor parameters but no Args:/Attributes: section",
        "C.method: parameters but no Args: section",
        "C.method: returns a value but has no Returns: section",
    ]
