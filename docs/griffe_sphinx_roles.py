"""Griffe extension: the reStructuredText bits of jaxbn's docstrings, as Markdown.

jaxbn's docstrings are Google style with a few reStructuredText constructs that
readers of the source know from the JAX libraries: ``.. math::`` blocks, roles such
as ``:func:`batch_norm```, and ``::`` before a literal block. The API site renders
Markdown, so before the docstrings are parsed this extension rewrites

- ``.. math::`` and its indented block into a ``$$ ... $$`` block (rendered by
  ``pymdownx.arithmatex`` and MathJax), and ``:math:`x``` into ``$x$``;
- a role naming a jaxbn object into a cross-reference to the object's canonical
  path (``[`batch_norm`][jaxbn.ops.batch_norm]``), which ``mkdocs build --strict``
  checks; a role naming something outside jaxbn (``jax.sharding.Mesh``) into
  inline code;
- ``text::`` before a literal block into ``text:`` (the block is already a code
  block in Markdown);
- ``#:`` comments above a module attribute into its docstring.

A role that names no object of jaxbn and is not a dotted name outside it (a typo,
or an object that was renamed) is logged as a warning, which fails a strict build;
so is a public module, class or function without a docstring
(``tests/test_docstrings.py`` checks their sections).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|obj|exc|const|math):`([^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*$")
LITERAL_MARKER = re.compile(r"(?<=\S)::$")
PACKAGE = "jaxbn"

logger = griffe.get_logger("griffe_sphinx_roles")


def _lookup(collection, path: str):
    """The object at ``path`` (aliases followed), or ``None``."""
    parts = path.split(".")
    if parts[0] not in collection.members:
        return None
    obj = collection.members[parts[0]]
    for part in parts[1:]:
        obj = _follow(collection, obj)
        if obj is None or part not in obj.members:
            return None
        obj = obj.members[part]
    return _follow(collection, obj)


def _follow(collection, obj, depth: int = 0):
    """Follows an alias to the object it names, within the loaded packages."""
    if not getattr(obj, "is_alias", False):
        return obj
    if depth > 10:
        return None
    target = _lookup(collection, obj.target_path) if obj.target_path != obj.path else None
    return None if target is None else _follow(collection, target, depth + 1)


def _needs_docstring(obj) -> bool:
    """A public module, class or function (method) shown on the API site."""
    if not (obj.is_module or obj.is_class or obj.is_function) or not _is_public(obj.path):
        return False
    return all(o.is_public for o in _ancestors(obj) if not o.is_module or o is obj)


def _ancestors(obj):
    while obj is not None:
        yield obj
        obj = obj.parent


def _is_public(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


class SphinxRoles(griffe.Extension):
    """Rewrites the reStructuredText constructs of jaxbn's docstrings as Markdown."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        """Rewrites every docstring of the package once it is loaded.

        Args:
            pkg: the package just loaded.
            loader: the loader, whose collection resolves the roles' targets.
            **kwargs: unused.
        """
        if pkg.name != PACKAGE:
            return
        collection = loader.modules_collection
        for obj in _walk(pkg):
            if obj.docstring is None and obj.is_attribute:
                _comment_docstring(obj)
            if obj.docstring is None and _needs_docstring(obj):
                logger.warning(f"{obj.path}: public {obj.kind.value} without a docstring")
            if obj.docstring is not None:
                obj.docstring.value = self.rewrite(obj, obj.docstring.value, collection)

    def rewrite(self, obj, text: str, collection) -> str:
        """``text`` with its math blocks, roles and literal markers as Markdown.

        Args:
            obj: the object the docstring belongs to (its scope resolves roles).
            text: the docstring.
            collection: the loaded modules.

        Returns:
            The rewritten docstring.
        """
        text = _math_blocks(text)
        text = "\n".join(LITERAL_MARKER.sub(":", line) for line in text.split("\n"))
        return ROLE.sub(lambda m: self._role(obj, m.group(1), m.group(2), collection), text)

    def _role(self, obj, kind: str, target: str, collection) -> str:
        if kind == "math":
            return f"${target}$"
        title = target
        if target.startswith("~"):
            target = target[1:]
            title = target.rsplit(".", 1)[-1]
        target = target.rstrip("()")
        for candidate in _candidates(obj, target):
            found = _lookup(collection, candidate)
            if found is not None and _is_public(found.path):
                return f"[`{title}`][{found.path}]"
            if found is not None:
                return f"`{title}`"  # a private object: no page to link to
        if "." in target and not target.startswith(PACKAGE + "."):
            return f"`{title}`"  # outside jaxbn
        logger.warning(f"{obj.path}: :{kind}:`{target}` names no object of {PACKAGE}")
        return f"`{title}`"


def _candidates(obj, target: str) -> list[str]:
    """Where ``target`` may live, seen from ``obj``: absolute, then outwards."""
    scopes = []
    scope = obj
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    return [target] + [f"{s}.{target}" for s in scopes] + [f"{PACKAGE}.{target}"]


def _comment_docstring(attr) -> None:
    """Gives an attribute documented by ``#:`` comments above it that text as docstring."""
    try:
        lines = attr.module.lines
    except (AttributeError, OSError):
        return
    if not attr.lineno or not lines:
        return
    comment = []
    i = attr.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        comment.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    if comment:
        attr.docstring = griffe.Docstring("\n".join(comment), parent=attr)


def _walk(obj):
    """``obj`` and every object defined in it (aliases are skipped: their targets
    are visited where they are defined)."""
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


def _math_blocks(text: str) -> str:
    """``.. math::`` and the indented block after it, as a ``$$`` block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        i += 1
        body: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        strip = min(len(b) - len(b.lstrip()) for b in body if b.strip()) if body else 0
        out.append(f"{indent}$$")
        out.extend(f"{indent}{b[strip:]}" if b.strip() else "" for b in body)
        out.append(f"{indent}$$")
        out.append("")
    return "\n".join(out)
