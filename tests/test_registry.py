"""The registry: names, errors, and plugins found through entry points (lazily, refused on
clashes, a broken one named in one line). Plugins come from a fake distribution: a dist-info
folder on ``sys.path`` with its own ``entry_points.txt``."""

import sys
import textwrap

import pytest
import torch

from chimera.models import MODELS
from chimera.optim import OPTIMIZERS, build_optimizer
from chimera.registry import Registry

GROUP = "chimera.test_plugins"


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """``install(entry_points, modules)``: a fake distribution ``fakeplug`` on ``sys.path``
    declaring ``entry_points`` ({group: {name: value}}) and shipping ``modules`` ({name: code})."""

    def install(entry_points: dict[str, dict[str, str]], modules: dict[str, str] | None = None
                ) -> None:
        info = tmp_path / "fakeplug-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
        text = "".join(f"[{group}]\n" + "".join(f"{n} = {v}\n" for n, v in eps.items())
                       for group, eps in entry_points.items())
        (info / "entry_points.txt").write_text(text)
        for name, code in (modules or {}).items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    for name in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[name]


def test_register_get_names_and_unknown_name():
    reg = Registry("widget")
    reg.register("a")(len)
    reg.register("b")(abs)
    assert reg.get("a") is len and reg.names() == ["a", "b"] and "b" in reg and "c" not in reg
    with pytest.raises(ValueError, match="unknown widget 'c'; known: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(abs)


def test_plugin_is_listed_and_imported_only_when_asked(plugin_dist):
    plugin_dist({GROUP: {"triple": "fakeplug_lazy:triple"}},
                {"fakeplug_lazy": "IMPORTED = True\ndef triple(x):\n    return 3 * x\n"})
    reg = Registry("widget", GROUP)
    reg.register("own")(abs)
    assert reg.names() == ["own", "triple"] and "triple" in reg
    assert "fakeplug_lazy" not in sys.modules  # listing imports nothing
    assert reg.get("triple")(2) == 6
    assert sys.modules["fakeplug_lazy"].IMPORTED


def test_discovery_waits_for_the_first_lookup(plugin_dist):
    reg = Registry("widget", GROUP)  # built before the plugin is installed
    plugin_dist({GROUP: {"late": "fakeplug_late:f"}}, {"fakeplug_late": "def f():\n    return 1\n"})
    assert reg.get("late")() == 1


def test_plugin_clashing_with_a_built_in_is_refused(plugin_dist):
    plugin_dist({GROUP: {"own": "fakeplug_clash:f"}})
    reg = Registry("widget", GROUP)
    reg.register("own")(abs)
    with pytest.raises(ValueError, match=r"entry point 'own = fakeplug_clash:f' \(chimera.test_"
                       r"plugins, from fakeplug 1.0\) clashes with the built-in widget 'own'"):
        reg.names()


def test_registering_a_name_a_plugin_holds_is_refused(plugin_dist):
    plugin_dist({GROUP: {"taken": "fakeplug_taken:f"}})
    reg = Registry("widget", GROUP)
    assert "taken" in reg
    with pytest.raises(ValueError, match="widget 'taken' is already registered by entry point "
                                         "'taken = fakeplug_taken:f'"):
        reg.register("taken")(abs)


def test_broken_plugin_is_one_line_naming_the_entry_point(plugin_dist):
    plugin_dist({GROUP: {"broken": "fakeplug_missing:f", "bad": "fakeplug_value:VALUE",
                         "loud": "fakeplug_loud:f"}},
                {"fakeplug_value": "VALUE = 3\n",
                 "fakeplug_loud": "raise RuntimeError('first line\\n  second line')\n"})
    reg = Registry("widget", GROUP)
    with pytest.raises(ImportError) as info:
        reg.get("broken")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("widget plugin entry point 'broken = fakeplug_missing:f' "
                              "(chimera.test_plugins, from fakeplug 1.0) failed to load: "
                              "ModuleNotFoundError")
    with pytest.raises(TypeError, match="widget plugin entry point 'bad = fakeplug_value:VALUE'"
                                        r".* must name a callable, got int"):
        reg.get("bad")
    with pytest.raises(ImportError, match="RuntimeError: first line second line$"):
        reg.get("loud")


def test_closed_registry_never_reads_entry_points(monkeypatch):
    def refuse(**kwargs):
        raise AssertionError("entry points read")

    monkeypatch.setattr("importlib.metadata.entry_points", refuse)
    reg = Registry("widget")
    reg.register("a")(abs)
    assert reg.names() == ["a"]


def test_optimizer_plugin_builds_through_build_optimizer(plugin_dist, monkeypatch):
    code = """
        import torch

        def build(model, lr=0.5):
            return torch.optim.SGD(model.parameters(), lr=lr)
    """
    plugin_dist({"chimera.optimizers": {"plugin_sgd": "fakeplug_opt:build"},
                 "chimera.models": {"plugin_mlp": "fakeplug_opt:build"}},
                {"fakeplug_opt": code})
    for registry in (OPTIMIZERS, MODELS):  # rediscover; the test's entries go afterwards
        monkeypatch.setattr(registry, "_plugins", None)
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    opt = build_optimizer("plugin_sgd", torch.nn.Linear(2, 2), lr=0.25)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.25
    assert "plugin_mlp" in MODELS.names()
