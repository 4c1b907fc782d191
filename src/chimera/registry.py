"""A tiny name -> factory registry (in the spirit of timm's), shared by every axis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to factories; unknown names are answered with the known ones.

    >>> models = Registry("model")
    >>> @models.register("mlp")
    ... def mlp(): ...
    >>> models.get("mlp") is mlp
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers a factory under ``name``."""

        def deco(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        """The factory registered as ``name``; ``ValueError`` listing known names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
