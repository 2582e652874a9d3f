"""The run config: the shared sections, the sections and methods the families register, and
config dicts of stored checkpoints read back unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cdir.core.errors import CdirError
from encoders.engine import config as engine_config
from encoders.engine.config import Config, Family, Section, methods, resolve_config, sections

WEIGHTS = Path(__file__).resolve().parents[3] / "encoders" / "weights"


def test_each_family_registers_its_methods_and_sections() -> None:
    from encoders.adapt.plugin import METHODS as ADAPT
    from encoders.distill.plugin import METHODS as DISTILL
    from encoders.ssl.plugin import METHODS as SSL

    owner = {name: fam.name for name, fam in methods().items()}
    assert owner == {**dict.fromkeys(SSL, "ssl"), **dict.fromkeys(ADAPT, "adapt"),
                     **dict.fromkeys(DISTILL, "distill")}
    assert list(sections()) == ["data", "model", "aug", "optim", "train", "monitor", "distill"]
    cfg = Config()
    assert type(cfg.aug).__name__ == "AugConfig" and type(cfg.distill).__name__ == "DistillConfig"
    assert list(cfg.to_dict()) == ["method", "method_name", "method_kwargs", "recipe",
                                   *sections()]
    with pytest.raises(AttributeError):
        cfg.no_such_section  # noqa: B018


def test_a_config_dict_round_trips_and_unknown_keys_are_refused() -> None:
    raw = {"aug": {"size": 32}, "distill": {"eval_every": 3}, "optim": {"epochs": 2}}
    cfg = resolve_config(raw, "moco", recipe="r", overrides=["aug.blur_p=0.0"])
    assert (cfg.aug.size, cfg.aug.blur_p, cfg.distill.eval_every, cfg.optim.epochs) == \
        (32, 0.0, 3, 2)
    again = Config.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.aug == cfg.aug
    with pytest.raises(CdirError, match="unknown key.*augs.*valid:.*aug"):
        Config.from_dict({**cfg.to_dict(), "augs": {}})
    with pytest.raises(CdirError, match="aug: unknown key"):
        Config.from_dict({**cfg.to_dict(), "aug": {"sise": 3}})
    with pytest.raises(CdirError, match="unknown method 'mocco'"):
        resolve_config({}, "mocco")


@pytest.mark.parametrize("name", ["emoji_synco.pt", "emoji_adapted.pt"])
def test_the_config_of_a_stored_checkpoint_reads_back_unchanged(name: str) -> None:
    stored = torch.load(WEIGHTS / name, map_location="cpu", weights_only=True)["config"]
    back = Config.from_dict(stored).to_dict()
    # every stored value kept, the sections in the stored order; what the file predates (a
    # section, a key) gets its default
    assert _kept(stored, back)
    assert [k for k in back if k in stored] == list(stored)


def _kept(old: dict, new: dict) -> bool:
    return all(k in new and (_kept(v, new[k]) if isinstance(v, dict) and v and
                             isinstance(new[k], dict) else new[k] == v) for k, v in old.items())


@dataclass
class ToyConfig:
    rounds: int = 1


def test_a_new_family_plugs_in_without_touching_the_engine(monkeypatch) -> None:
    toy = Family("toy", {"toy_a": object(), "toy_b": object()},
                 (Section("toy", lambda: ToyConfig, after="optim"),))
    monkeypatch.setitem(engine_config._FAMILIES, "toy", toy)
    assert list(sections())[list(sections()).index("optim") + 1] == "toy"
    cfg = resolve_config({"toy": {"rounds": 3}}, "toy_b")
    assert cfg.toy == ToyConfig(3) and cfg.to_dict()["toy"] == {"rounds": 3}
    assert methods()["toy_a"] is toy

    clash = Family("clash", {"moco": object()})
    monkeypatch.setitem(engine_config._FAMILIES, "clash", clash)
    with pytest.raises(CdirError, match="'moco' is registered by ssl and clash"):
        methods()
