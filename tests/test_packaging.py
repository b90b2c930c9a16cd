"""Packaging: setup.py installs ``moe_plugin`` and its subpackages only (the megatron-core
patches as ``moe_plugin.patches``, no top-level package of a generic name), and the README's
layout section lists every module of the package."""
import os
import re
import runpy

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PKG = os.path.join(ROOT, "moe_plugin")


def _setup_kwargs(monkeypatch) -> dict:
    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)  # setup.py's find_packages looks in the working directory
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def _subpackages() -> list:
    return sorted(os.path.relpath(d, ROOT).replace(os.sep, ".")
                  for d, _, files in os.walk(PKG)
                  if "__init__.py" in files and "__pycache__" not in d)


def test_setup_installs_moe_plugin_only(monkeypatch):
    packages = _setup_kwargs(monkeypatch)["packages"]
    assert "moe_plugin.patches" in packages and "patches" not in packages
    assert all(p == "moe_plugin" or p.startswith("moe_plugin.") for p in packages), packages
    assert sorted(packages) == _subpackages()


def test_patches_import_from_the_package():
    from moe_plugin import patches
    from moe_plugin.patches import megatron_cpu, megatron_te_general_gemm  # noqa: F401
    assert os.path.dirname(patches.__file__) == os.path.join(PKG, "patches")
    assert callable(patches.apply)


def _layout_entries() -> dict:
    """``{entry: its text}`` of the README's layout block under ``moe_plugin/``: each line at
    indentation 2 starts an entry (a module or a folder); deeper lines belong to it."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    block = re.search(r"^## Layout\n\n```\n(.*?)^```", text, re.S | re.M).group(1)
    lines = block.split("\n")
    assert lines[0] == "moe_plugin/"
    entries, current = {}, None
    for ln in lines[1:]:
        if not ln.startswith("  "):
            break
        m = re.match(r"^  (\S+)", ln)
        if m:
            current = m.group(1)
            entries[current] = ln
        else:
            entries[current] += "\n" + ln
    return entries


def _check_layout(entries: dict) -> None:
    for d, _, files in os.walk(PKG):
        if "__pycache__" in d:
            continue
        rel = os.path.relpath(d, PKG)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            if rel == ".":
                assert f in entries, f"README layout: moe_plugin/{f} missing"
            else:
                folder = rel.split(os.sep)[0] + "/"
                assert folder in entries, f"README layout: moe_plugin/{folder} missing"
                if f != "__init__.py":
                    assert re.search(rf"(?<![\w.]){re.escape(f)}\b", entries[folder]), \
                        f"README layout: moe_plugin/{rel}/{f} missing"


def test_readme_layout_lists_every_module():
    _check_layout(_layout_entries())


@pytest.mark.parametrize("missing", ["graphs.py", "codes.py"])
def test_layout_check_notices_a_missing_module(missing):
    """The check fails when a module is left out (issue 22: graphs.py; a kernels/ module)."""
    entries = {k: v.replace(missing, "") for k, v in _layout_entries().items() if k != missing}
    with pytest.raises(AssertionError, match=re.escape(missing)):
        _check_layout(entries)
