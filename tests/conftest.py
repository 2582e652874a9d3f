"""Shared test fixtures: tiny image galleries built on the fly, a folder of corrupt files, and the
offline switch for the Hugging Face hub. The helpers they use (drawing, tree writing) live in
``tests/helpers/``.

Fixtures (use them by naming them as test arguments):

- ``officehome_root``  (session, READ-ONLY): an Office-Home-shaped tree
  ``<tmp>/officehome/{Art,Clipart,Product,Real World}/<Class>/<n>.jpg`` with the classes of
  ``SHAPE_CLASSES`` and 3 images per class and domain (48 JPEGs, 64 px). Do not write into it;
  use ``make_officehome`` when a test needs its own copy or a variant.
- ``make_officehome``  (function): a factory ``make_officehome(**options) -> Path`` that writes a
  new tree under the test's ``tmp_path``; options are those of ``write_shape_tree``
  (``folder_names``, ``train_level``, ``top_folder``, ``per_class``, ``classes``, ``size``,
  ``n_corrupt``...).
- ``make_domainnet``   (function): a factory ``make_domainnet(**options) -> Path`` writing a tiny
  DomainNet-shaped tree with split files; options are those of ``write_domainnet_tree``.
- ``corrupt_dir``      (function): a folder holding the files of ``CORRUPT_FILES`` (a truncated
  JPEG, a zero-byte file, a text file named .jpg, a PNG whose header claims a decompression bomb).
- ``hf_offline``       (function): HF_HUB_OFFLINE=1 and one torch thread for the test; a module
  uses it for all its tests with ``pytestmark = pytest.mark.usefixtures("hf_offline")``.

Every test starts without the caller's offline switches (``OFFLINE_VARIABLES``, an autouse
fixture): a test is online or offline because it says so, not because the shell running pytest
had ``TRANSFORMERS_OFFLINE=1``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.trees import write_corrupt_files, write_domainnet_tree, write_shape_tree

# the switches that huggingface_hub / transformers (and encoders.hub.offline) read
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture(autouse=True)
def _caller_offline_switches_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits the caller's offline switches; ``hf_offline`` (or the test) sets them.
    Autouse fixtures run first, so a test's own setting wins."""
    for var in OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    _hub_reads_offline(monkeypatch, False)


def _hub_reads_offline(monkeypatch: pytest.MonkeyPatch, value: bool) -> None:
    """huggingface_hub reads the switches once, at its import (whenever some test happened to
    import it first): make its copy agree with this test's environment."""
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value)


@pytest.fixture(scope="session")
def officehome_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared, read-only Office-Home-shaped tree (4 domains x 4 classes x 3 JPEGs of 64 px)."""
    return write_shape_tree(tmp_path_factory.mktemp("officehome"))


@pytest.fixture
def make_officehome(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_officehome(**write_shape_tree_options) -> Path`` under this test's tmp_path
    (each call gets its own folder)."""
    count = iter(range(10_000))

    def make(**options: object) -> Path:
        return write_shape_tree(tmp_path / f"officehome{next(count)}", **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_domainnet(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_domainnet(**write_domainnet_tree_options) -> Path`` under tmp_path."""
    count = iter(range(10_000))

    def make(**options: object) -> Path:
        return write_domainnet_tree(tmp_path / f"domainnet{next(count)}", **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def corrupt_dir(tmp_path: Path) -> Path:
    """A folder with the corrupt files of :data:`CORRUPT_FILES` (and nothing else)."""
    return write_corrupt_files(tmp_path / "corrupt")


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network for the Hugging Face hub (models come from local folders or the cache) and one
    torch thread (the machines running the tests have few cores)."""
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_reads_offline(monkeypatch, True)
    torch.set_num_threads(1)
