"""What the gallery kinds' table says about each kind, which the command line, the gallery stage
and the recipe ask instead of the kinds' names."""

from __future__ import annotations

import pytest

from cdir.core.errors import CdirError
from cdir.galleries import KINDS, recorded_name
from cdir.galleries.domainnet import load_domainnet


def test_kinds_record_their_dataset_name() -> None:
    assert recorded_name("csv") == "table"
    assert recorded_name("folder") == "folder" and recorded_name("emoji") == "emoji"


def test_only_folder_trees_read_every_subfolder_as_a_domain() -> None:
    assert [k for k, gk in KINDS.items() if gk.any_folder_a_domain] == ["folder"]


def test_domainnet_has_no_val_split(tmp_path) -> None:
    assert KINDS["domainnet"].splits == ("all", "train", "test")
    assert "val" in KINDS["folder"].splits
    with pytest.raises(CdirError, match="DomainNet has train and test splits, not 'val'"):
        (tmp_path / "clipart" / "bird").mkdir(parents=True)
        load_domainnet(tmp_path, split="val")
