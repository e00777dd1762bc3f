"""SynthRooms: procedurally generated indoor scenes with exact metric depth and NYU13 labels.

Everything runs offline on the CPU: `render_scene(seed, height, width)` samples and ray-casts one
furnished room; `generate(root, ...)` writes a dataset directory of PNGs and a manifest;
`SynthRoomsDataset(path, split)` reads it as the project's sample dicts. For custom geometry,
build a `Scene` (a `Room`, `Box` objects, `Light`s) and call `render(scene, camera, h, w)`.
"""
from .dataset import SynthRoomsDataset, load_manifest
from .raycast import render
from .rooms import ROOM_TYPES, SPLITS, render_scene, sample_scene, scene_rng
from .scene import NYU_INTRINSICS, Box, Camera, Light, Material, Room, Scene
from .store import DEPTH_UNITS, VERSION, dataset_name, generate, read_manifest, rendered_val_sizes

__all__ = [
    "Box", "Camera", "DEPTH_UNITS", "Light", "Material", "NYU_INTRINSICS", "ROOM_TYPES", "Room",
    "SPLITS", "Scene", "SynthRoomsDataset", "VERSION", "dataset_name", "generate",
    "load_manifest", "read_manifest", "render", "render_scene", "sample_scene", "scene_rng",
]
