"""The model-family registry: YOLO11 resolves as it always did, an unknown state dict is refused
naming the registered families, and a second family is one module plus one registration (here,
a toy family defined and registered in this file only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fluxshard.models import (YOLO11, CheckpointError, ModelFamily, build_yolo11, fuse,
                              load_model, postprocess, register_family, save_checkpoint)
from fluxshard.models.families import (family_for_format, family_for_state_dict, family_named,
                                       family_of, unregister_family)
from fluxshard.models.modules import make_anchors
from fluxshard.models.weights import infer_architecture
from fluxshard.sessions import load_dense_model


def test_yolo11_is_the_registered_family():
    family = family_named("yolo11")
    assert family is family_named("YOLO11") is family_for_format("fluxshard-yolo11")
    assert family.model_class is YOLO11 and family.build is build_yolo11
    assert family.tag("n", "detect") == "yolo11n-detect"


@pytest.mark.parametrize("scale,task,nc", [("n", "detect", 7), ("s", "segment", 3)])
def test_yolo11_state_dicts_and_checkpoints_resolve_as_before(tmp_path, scale, task, nc):
    model = build_yolo11(scale, task, nc, {i: f"part{i}" for i in range(nc)})
    sd = model.state_dict()
    assert family_for_state_dict(sd) is family_of(model) is family_named("YOLO11")
    assert infer_architecture(sd) == (scale, task, nc)
    path = save_checkpoint(model, tmp_path / "m.pt", epoch=3)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fluxshard-yolo11" and raw["version"] == 1
    for source in (path, sd, {"model": sd, "names": model.names}):
        loaded = load_model(source)
        assert type(loaded) is YOLO11
        assert (loaded.scale, loaded.task, loaded.nc) == (scale, task, nc)
    assert load_model(path).meta == {"epoch": 3}
    assert load_model(path).names == model.names
    folded = load_model(fuse(build_yolo11(scale, task, nc)).state_dict())  # BN-folded weights
    assert type(folded) is YOLO11 and not any(isinstance(m, nn.BatchNorm2d)
                                              for m in folded.modules())


def test_dense_model_without_weights_is_a_random_yolo11(tmp_path, monkeypatch):
    from fluxshard.models import weights
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS", tmp_path / "absent.pt")
    with pytest.warns(UserWarning, match="RANDOM YOLO11n"):
        model = load_dense_model(None, "n")
    assert type(model) is YOLO11 and model.scale == "n"


def test_unknown_state_dict_names_the_registered_families(tmp_path):
    sd = {"encoder.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"matches no registered model family \(YOLO11, Darknet\)"):
        family_for_state_dict(sd)
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"not a YOLO11 or Darknet checkpoint.*families: YOLO11, Darknet"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(TypeError, match=r"no model of a registered family \(YOLO11, Darknet\)"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "linear.pt")
    with pytest.raises(ValueError, match="unknown model family 'nope'; registered: YOLO11, Darknet"):
        family_named("nope")


# ---------------------------------------------------------------- a toy second family


class ToyHead(nn.Module):
    """A one-level anchor-free head with the interface families.py documents."""

    reg_max = 1

    def __init__(self, c: int, nc: int):
        super().__init__()
        self.nc, self.nl, self.no = nc, 1, 4 * self.reg_max + nc
        self.register_buffer("stride", torch.tensor([8.0]), persistent=False)
        self.pred = nn.Conv2d(c, self.no, 1)
        self.dfl = nn.Identity()

    def head_maps(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.pred(x[0])]

    def anchors_for(self, maps):
        return make_anchors([tuple(m.shape[2:]) for m in maps], self.stride.tolist(),
                            maps[0].dtype, maps[0].device)

    def decode(self, maps):
        anchors, strides = self.anchors_for(maps)
        x = maps[0].flatten(2)
        lt, rb = x[:, :4].exp().chunk(2, 1)
        a = anchors.t().unsqueeze(0)
        x1y1, x2y2 = a - lt, a + rb
        box = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides.t()
        return torch.cat((box, x[:, 4:].sigmoid()), 1)

    def forward(self, x):
        maps = self.head_maps(x)
        return maps if self.training else self.decode(maps)


class ToyNet(nn.Module):
    WIDTHS = {"a": 8, "b": 16}

    def __init__(self, scale: str = "a", task: str = "detect", num_classes: int = 2, names=None):
        super().__init__()
        self.scale, self.task, self.nc = scale, task, num_classes
        self.names = dict(names or {i: f"toy{i}" for i in range(num_classes)})
        c = self.WIDTHS[scale]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 8, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.model = nn.ModuleList([ToyHead(c, num_classes)])

    @property
    def head(self) -> ToyHead:
        return self.model[-1]

    def forward(self, x):
        return self.head([self.stem(x)])


def toy_architecture(sd):
    scale = {c: s for s, c in ToyNet.WIDTHS.items()}[sd["stem.0.weight"].shape[0]]
    return scale, "detect", int(sd["model.0.pred.weight"].shape[0]) - 4


def fold_toy(model: ToyNet) -> ToyNet:  # the toy keeps its BN; folding is not what is tested
    return model


@pytest.fixture
def toy_family():
    family = register_family(ModelFamily(
        name="Toy", checkpoint_format="fluxshard-toy", model_class=ToyNet, build=ToyNet,
        matches_state_dict=lambda sd: "stem.0.weight" in sd, infer_architecture=toy_architecture,
        fuse=fold_toy))
    yield family
    unregister_family("Toy")


def test_a_second_family_loads_through_load_model_from_its_own_format(tmp_path, toy_family):
    torch.manual_seed(0)
    model = ToyNet("b", num_classes=3).eval()
    path = save_checkpoint(model, tmp_path / "toy.pt", note="toy")
    assert torch.load(path, weights_only=True)["format"] == "fluxshard-toy"
    loaded = load_model(path, fused=True)
    assert type(loaded) is ToyNet and family_of(loaded) is toy_family
    assert (loaded.scale, loaded.task, loaded.nc) == ("b", "detect", 3)
    assert loaded.meta == {"note": "toy"}
    assert type(load_model(model.state_dict())) is ToyNet  # a bare state dict finds it too
    assert type(load_model(build_yolo11("n").state_dict())) is YOLO11  # and YOLO11 still loads
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = loaded(x)
        torch.testing.assert_close(out, model.half().float()(x))  # checkpoints are fp16
    assert out.shape == (1, 4 + 3, (64 // 8) * (96 // 8))
    detections = postprocess(out, (64, 96), conf_thres=0.0)
    assert len(detections) == 1 and len(detections[0].boxes)
    assert np.isfinite(detections[0].boxes).all()
    with pytest.raises(CheckpointError, match=r"not a YOLO11 or Darknet or Toy checkpoint"):
        load_model({"encoder.weight": torch.zeros(1)})


def test_a_second_family_cannot_take_a_registered_name_or_format(toy_family):
    with pytest.raises(ValueError, match="already registered"):
        register_family(ModelFamily(name="toy", checkpoint_format="x", model_class=ToyNet,
                                    build=ToyNet, matches_state_dict=bool,
                                    infer_architecture=toy_architecture))
    with pytest.raises(ValueError, match="already belongs to the YOLO11 family"):
        register_family(ModelFamily(name="Toy2", checkpoint_format="fluxshard-yolo11",
                                    model_class=ToyNet, build=ToyNet, matches_state_dict=bool,
                                    infer_architecture=toy_architecture))
