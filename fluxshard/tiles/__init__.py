"""The v2 tile-batched executor: warped output cache, critical blocks as batched crops on a dense
engine, salience and freshness (docs/DESIGN.md, "The tile executor")."""

from fluxshard.tiles.crops import Crop, plan_crops, salience_order
from fluxshard.tiles.engine import OnnxMapsEngine, TorchMapsEngine, make_engine
from fluxshard.tiles.raw_maps import raw_head_maps
from fluxshard.tiles.executor import STRIDES, TileExecutor, TileReport, TileStreamState

__all__ = ["Crop", "plan_crops", "salience_order", "OnnxMapsEngine", "TorchMapsEngine",
           "make_engine", "raw_head_maps", "STRIDES", "TileExecutor", "TileReport",
           "TileStreamState"]
