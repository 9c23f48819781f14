"""Drawing primitives of the procedural "rooms" (`rooms.py`): a pinhole camera and a float
RGB canvas that paints world-space polygons with PIL (anti-aliased by supersampling)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["Camera", "Canvas", "Shade", "Vec3"]

Vec3 = tuple[float, float, float]
Shade = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""A shading field: (u, v) pixel coordinates in [0, 1], each (res, res) -> factor (res, res)."""


class Camera:
    """A pinhole camera with yaw and pitch (> 0 tilts down); y is up, the back wall at z = depth."""

    def __init__(self, pos: Vec3, yaw: float, pitch: float, fov_deg: float, res: int) -> None:
        self.pos = np.asarray(pos, dtype=np.float64)
        cy, sy = math.cos(yaw), math.sin(yaw)
        cp, sp = math.cos(pitch), math.sin(pitch)
        rot_y = np.array([[cy, 0.0, -sy], [0.0, 1.0, 0.0], [sy, 0.0, cy]])
        rot_x = np.array([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])
        self.rot = rot_x @ rot_y  # world -> camera
        self.res = res
        self.focal = (res / 2) / math.tan(math.radians(fov_deg) / 2)

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> camera coordinates (N, 3); z is the distance along the view."""
        return (points - self.pos) @ self.rot.T

    def project(self, cam_points: np.ndarray) -> list[tuple[float, float]]:
        """Camera points (N, 3) with z > 0 -> pixel coordinates (x right, y down)."""
        c = self.res / 2
        return [(c + self.focal * x / z, c - self.focal * y / z) for x, y, z in cam_points]

    def rays(self) -> np.ndarray:
        """World-space ray directions of every pixel centre, shape (res, res, 3), unnormalised."""
        c = self.res / 2
        coords = (np.arange(self.res) + 0.5 - c) / self.focal
        dx, dy = np.meshgrid(coords, -coords)
        d_cam = np.stack([dx, dy, np.ones_like(dx)], axis=-1)
        return d_cam @ self.rot  # inverse rotation = transpose


def clip_near(points: np.ndarray, near: float = 0.05) -> np.ndarray:
    """Clip a convex camera-space polygon (N, 3) against the plane z = near (Sutherland-Hodgman)."""
    out: list[np.ndarray] = []
    n = len(points)
    for i in range(n):
        a, b = points[i], points[(i + 1) % n]
        a_in, b_in = a[2] >= near, b[2] >= near
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (near - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out) if out else np.zeros((0, 3))


class Canvas:
    """A float RGB canvas, shape (res, res, 3) in [0, 1], with polygon painting helpers."""

    def __init__(self, cam: Camera, rng: np.random.Generator) -> None:
        self.cam = cam
        self.rng = rng
        self.res = cam.res
        self.rgb = np.zeros((cam.res, cam.res, 3))
        grid = (np.arange(cam.res) + 0.5) / cam.res
        self.u, self.v = np.meshgrid(grid, grid)  # u: 0 left .. 1 right, v: 0 top .. 1 bottom

    def mask(self, corners: list[Vec3], blur: float = 0.0) -> np.ndarray | None:
        """Coverage (res, res) in [0, 1] of a convex world polygon, or None if it is invisible."""
        cam_pts = clip_near(self.cam.to_camera(np.asarray(corners, dtype=np.float64)))
        if len(cam_pts) < 3:
            return None
        layer = Image.new("L", (self.res, self.res), 0)
        ImageDraw.Draw(layer).polygon(self.cam.project(cam_pts), fill=255)
        if blur > 0:
            layer = layer.filter(ImageFilter.GaussianBlur(blur * self.res))
        m = np.asarray(layer, dtype=np.float64) / 255.0
        return m if m.any() else None

    def paint(self, corners: list[Vec3], color: np.ndarray, shade: Shade | None = None,
              noise: float = 0.015) -> np.ndarray | None:
        """Fill a world polygon with `color` (3,), times an optional shading field of (u, v)."""
        m = self.mask(corners)
        if m is None:
            return None
        field = np.broadcast_to(color, self.rgb.shape).copy()
        if shade is not None:
            field *= shade(self.u, self.v)[..., None]
        if noise > 0:
            field += self.rng.normal(0.0, noise, size=(self.res, self.res, 1))
        self.rgb = self.rgb * (1 - m[..., None]) + field * m[..., None]
        return m

    def box(self, lo: Vec3, hi: Vec3, color: np.ndarray, top: np.ndarray | None = None,
            noise: float = 0.015) -> None:
        """Paint the camera-facing faces (front, side, top) of an axis-aligned box."""
        (x0, y0, z0), (x1, y1, z1) = lo, hi
        cx, cy, _ = self.cam.pos
        faces: list[tuple[list[Vec3], np.ndarray]] = []
        if cx < x0:
            faces.append(([(x0, y0, z0), (x0, y0, z1), (x0, y1, z1), (x0, y1, z0)], color * 0.78))
        elif cx > x1:
            faces.append(([(x1, y0, z0), (x1, y0, z1), (x1, y1, z1), (x1, y1, z0)], color * 0.72))
        faces.append(([(x0, y0, z0), (x1, y0, z0), (x1, y1, z0), (x0, y1, z0)], color * 0.88))
        if cy > y1:
            faces.append(([(x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)],
                          top if top is not None else color))
        for corners, c in faces:
            self.paint(corners, c, noise=noise)

    def darken(self, corners: list[Vec3], amount: float, blur: float) -> None:
        """Multiply the canvas by (1 - amount) under a soft (blurred) world polygon: a shadow."""
        m = self.mask(corners, blur=blur)
        if m is not None:
            self.rgb *= 1 - amount * m[..., None]
