"""A tiny name -> factory registry (in the spirit of timm's), shared by every axis.

A registry built with an entry-point ``group`` is open to other packages: a distribution that
declares, in its ``pyproject.toml``::

    [project.entry-points."chimera.optimizers"]
    my_opt = "my_package.optim:build_my_opt"

adds ``my_opt`` to ``OPTIMIZERS``. The group's entry points are listed once, on the first lookup
or listing (nothing is imported before Chimera needs a name); a plugin's object is imported when
its name is first asked for. A plugin whose name is already taken (by Chimera or another plugin)
is refused with a ``ValueError`` naming both; one that fails to import raises ``ImportError``
naming its entry point. Groups: ``chimera.optimizers``, ``chimera.models``, ``chimera.tasks``,
``chimera.rules``, ``chimera.quantizers`` (docs/integrations.md).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


def _describe(ep: metadata.EntryPoint) -> str:
    """``'name = module:attr' (group, from dist 1.0)``: enough to find the plugin."""
    dist = getattr(ep, "dist", None)
    origin = f", from {dist.name} {dist.version}" if dist is not None else ""
    return f"entry point '{ep.name} = {ep.value}' ({ep.group}{origin})"


class Registry(Generic[F]):
    """Maps names to factories; unknown names are answered with the known ones.

    ``group`` names the entry-point group that plugins register into (module docstring);
    ``None`` keeps the registry closed.

    >>> models = Registry("model")
    >>> @models.register("mlp")
    ... def mlp(): ...
    >>> models.get("mlp") is mlp
    True
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, F] = {}
        self._plugins: dict[str, metadata.EntryPoint] | None = None if group else {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers a factory under ``name``."""

        def deco(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            if self._plugins and name in self._plugins:
                raise ValueError(f"{self.kind} '{name}' is already registered by "
                                 f"{_describe(self._plugins[name])}")
            self._entries[name] = fn
            return fn

        return deco

    def _discover(self) -> dict[str, metadata.EntryPoint]:
        """The group's entry points by name, listed once; a taken name is a ``ValueError``."""
        if self._plugins is None:
            found: dict[str, metadata.EntryPoint] = {}
            for ep in metadata.entry_points(group=self.group):
                if ep.name in self._entries:
                    raise ValueError(f"{_describe(ep)} clashes with the built-in "
                                     f"{self.kind} '{ep.name}'; uninstall or rename the plugin")
                if ep.name in found and found[ep.name].value != ep.value:
                    raise ValueError(f"{_describe(ep)} clashes with {_describe(found[ep.name])}; "
                                     "uninstall one of them")
                found[ep.name] = ep
            self._plugins = found
        return self._plugins

    def _load(self, ep: metadata.EntryPoint) -> F:
        """The plugin's object, imported once; a failure names the entry point in one line."""
        try:
            fn = ep.load()
        except Exception as exc:
            detail = " ".join(str(exc).split())  # one line, whatever the plugin raised
            raise ImportError(f"{self.kind} plugin {_describe(ep)} failed to load: "
                              f"{type(exc).__name__}: {detail}") from exc
        if not callable(fn):
            raise TypeError(f"{self.kind} plugin {_describe(ep)} must name a callable, got "
                            f"{type(fn).__name__}")
        self._entries[ep.name] = fn
        return fn

    def get(self, name: str) -> F:
        """The factory registered as ``name``; ``ValueError`` listing known names otherwise."""
        if name in self._entries:
            return self._entries[name]
        plugin = self._discover().get(name)
        if plugin is None:
            raise ValueError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")
        return self._load(plugin)

    def names(self) -> list[str]:
        """Registered names in registration order, then the plugins' in discovery order."""
        return list(dict.fromkeys([*self._entries, *self._discover()]))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._discover()
