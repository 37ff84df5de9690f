"""Cutting high-resolution images into overlapping tiles, and stitching tile maps back.

Tiles are `tile` x `tile` pixels at the original resolution, `tile - overlap` apart; the last
tile of a row or column is moved back to end on the image border, so every pixel is covered
and no tile is padded. Stitching averages the maps where tiles overlap.
"""

from __future__ import annotations

import numpy as np

from vtadl.exceptions import DataError


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the tiles covering a height x width image, row by row."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise DataError(f"tiles need 0 <= overlap < tile, got tile {tile} and overlap {overlap}")
    if height < tile or width < tile:
        raise DataError(f"a {height}x{width} image is smaller than the {tile}x{tile} tile")
    stride = tile - overlap
    return [(y, x) for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


def cut_tiles(image: np.ndarray, tile: int, overlap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tiles (M, tile, tile, ...), corners (M, 2)) of an (H, W, ...) array."""
    corners = np.array(tile_grid(image.shape[0], image.shape[1], tile, overlap), dtype=np.int32)
    tiles = np.stack([image[y : y + tile, x : x + tile] for y, x in corners])
    return tiles, corners


def stitch_tiles(tile_maps: np.ndarray, coords: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One float32 (H, W) map from (M, t, t) tile maps placed at (M, 2) corners (y, x).

    Overlapping values are averaged. Maps must be at the tiles' original resolution:
    upsample a model's smaller output first. Every pixel must be covered by some tile.
    """
    maps = np.asarray(tile_maps, dtype=np.float64)
    coords = np.asarray(coords)
    if maps.ndim != 3 or coords.shape != (len(maps), 2):
        raise ValueError(
            f"expected (M, t, t) maps and (M, 2) corners, got {maps.shape} and {coords.shape}"
        )
    h, w = shape
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.int32)
    th, tw = maps.shape[1:]
    for tile_map, (y, x) in zip(maps, coords.tolist()):
        if y < 0 or x < 0 or y + th > h or x + tw > w:
            raise ValueError(f"a {th}x{tw} tile at ({y}, {x}) lies outside the {h}x{w} map")
        total[y : y + th, x : x + tw] += tile_map
        count[y : y + th, x : x + tw] += 1
    if not count.all():
        raise ValueError(f"the tiles leave {int((count == 0).sum())} pixels of the map uncovered")
    return (total / count).astype(np.float32)
