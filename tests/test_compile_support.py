"""When the automatic fast paths may compile: the CPU check needs dynamo and a C++ compiler."""

import pytest
import torch

from chimera.compile_support import cpu_compile_usable


@pytest.fixture(autouse=True)
def fresh_cache():
    cpu_compile_usable.cache_clear()
    yield
    cpu_compile_usable.cache_clear()


def test_cpu_compile_needs_the_compiler_named_by_cxx(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert cpu_compile_usable() is False


def test_cpu_compile_finds_an_existing_cxx(monkeypatch, tmp_path):
    compiler = tmp_path / "my-c++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    assert cpu_compile_usable() is torch._dynamo.is_dynamo_supported()


def test_cpu_compile_without_dynamo_is_off(monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert cpu_compile_usable() is False
