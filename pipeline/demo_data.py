"""The built-in procedural image domain "rooms": tiny bedroom-like scenes, and shards of them.

A room is a box seen by a pinhole camera from near its front: ceiling, back wall and side walls
in perspective, a floor with wooden planks, carpet or tiles, a bed against the back wall (frame,
headboard, blanket, pillows), a bedside table with a lamp, a window (sky and frame), optionally
a picture and a rug. Colours, positions, sizes and the camera are random; faces get simple
shading (gradients, soft shadows, lamp glow) and light texture noise. The scene is drawn with
PIL polygons at a supersampled resolution and downsampled, so edges are anti-aliased.

Only numpy and PIL are used; `render_room` is deterministic for a given generator state, and
`write_demo_data` produces byte-identical shards for a given seed.
"""

from __future__ import annotations

import colorsys
import io
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from pipeline.errors import PipelineError, StorageError
from sdedit.strokes import simulate_strokes

logger = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]
Shade = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """An RGB colour, shape (3,), float in [0, 1], from hue / saturation / value in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


class _Camera:
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


def _clip_near(points: np.ndarray, near: float = 0.05) -> np.ndarray:
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


class _Canvas:
    """A float RGB canvas, shape (res, res, 3) in [0, 1], with polygon painting helpers."""

    def __init__(self, cam: _Camera, rng: np.random.Generator) -> None:
        self.cam = cam
        self.rng = rng
        self.res = cam.res
        self.rgb = np.zeros((cam.res, cam.res, 3))
        grid = (np.arange(cam.res) + 0.5) / cam.res
        self.u, self.v = np.meshgrid(grid, grid)  # u: 0 left .. 1 right, v: 0 top .. 1 bottom

    def mask(self, corners: list[Vec3], blur: float = 0.0) -> np.ndarray | None:
        """Coverage (res, res) in [0, 1] of a convex world polygon, or None if it is invisible."""
        cam_pts = _clip_near(self.cam.to_camera(np.asarray(corners, dtype=np.float64)))
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


def _floor_texture(canvas: _Canvas, rng: np.random.Generator, width: float,
                   depth: float) -> np.ndarray:
    """Per-pixel floor colour (res, res, 3) from ray / floor-plane hits: planks, carpet or tiles."""
    cam = canvas.cam
    rays = cam.rays()
    dy = np.minimum(rays[..., 1], -1e-6)
    t = -cam.pos[1] / dy
    x = cam.pos[0] + t * rays[..., 0]
    z = cam.pos[2] + t * rays[..., 2]
    kind = rng.choice(["wood", "wood", "carpet", "tiles"])
    if kind == "wood":
        base = _hsv(rng.uniform(0.05, 0.11), rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.75))
        plank_w = rng.uniform(0.12, 0.22)
        board_len = rng.uniform(0.8, 1.6)
        idx = np.floor((x + width / 2) / plank_w)
        offsets = rng.uniform(0, board_len, size=64)
        seg = np.floor((z + offsets[idx.astype(int) % 64]) / board_len)
        jitter = rng.uniform(-1, 1, size=(64, 16))
        var = jitter[idx.astype(int) % 64, seg.astype(int) % 16]
        colour = base * (1 + 0.13 * var)[..., None]
        frac = ((x + width / 2) / plank_w) % 1.0
        grain = 0.04 * np.sin(z * rng.uniform(25, 45) + idx * 1.7)
        colour = colour * (1 + grain)[..., None]
        edge = np.minimum(frac, 1 - frac) * plank_w
        colour *= np.where(edge < 0.008, 0.7, 1.0)[..., None]
    elif kind == "carpet":
        base = _hsv(rng.uniform(0, 1), rng.uniform(0.1, 0.4), rng.uniform(0.35, 0.8))
        colour = base * (1 + rng.normal(0, 0.04, size=x.shape))[..., None]
    else:
        base = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.15), rng.uniform(0.55, 0.9))
        tile = rng.uniform(0.3, 0.5)
        fx, fz = (x / tile) % 1.0, (z / tile) % 1.0
        grout = (np.minimum(fx, 1 - fx) < 0.03) | (np.minimum(fz, 1 - fz) < 0.03)
        colour = base * np.where(grout, 0.8, 1.0)[..., None]
    # Light falls off towards the camera and the corners of the room.
    falloff = 0.75 + 0.25 * np.clip(z / depth, 0, 1) - 0.1 * (np.abs(x) / (width / 2)) ** 2
    return colour * falloff[..., None]


def render_room(rng: np.random.Generator, size: int) -> Image.Image:
    """Render one random bedroom-like scene.

    Args:
        rng: the source of every random choice; the same generator state gives the same image.
        size: output width and height in pixels (>= 8).

    Returns:
        An RGB PIL image of `size` x `size`.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    ss = max(2, math.ceil(256 / size))
    res = size * ss
    width, depth, height = rng.uniform(3.4, 4.8), rng.uniform(3.4, 4.6), rng.uniform(2.5, 2.9)
    cam = _Camera(pos=(rng.uniform(-0.6, 0.6) * width / 4, rng.uniform(1.3, 1.8),
                       rng.uniform(0.1, 0.6)),
                  yaw=math.radians(rng.uniform(-14, 14)), pitch=math.radians(rng.uniform(5, 17)),
                  fov_deg=rng.uniform(62, 78), res=res)
    cv = _Canvas(cam, rng)
    hw = width / 2

    wall = _hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.35), rng.uniform(0.6, 0.92))
    if rng.random() < 0.3:  # warm beige / white walls are the most common
        wall = _hsv(rng.uniform(0.07, 0.13), rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95))
    ceiling = _hsv(0.1, 0.05, rng.uniform(0.8, 0.97))
    vert: Shade = lambda u, v: 1.0 - 0.18 * v  # noqa: E731  (walls darken towards the floor)
    cv.paint([(-hw, height, 0), (hw, height, 0), (hw, height, depth), (-hw, height, depth)],
             ceiling, shade=lambda u, v: 0.85 + 0.15 * v)
    cv.paint([(-hw, 0, depth), (hw, 0, depth), (hw, height, depth), (-hw, height, depth)],
             wall, shade=vert)
    cv.paint([(-hw, 0, 0), (-hw, 0, depth), (-hw, height, depth), (-hw, height, 0)],
             wall * rng.uniform(0.72, 0.88), shade=vert)
    cv.paint([(hw, 0, 0), (hw, 0, depth), (hw, height, depth), (hw, height, 0)],
             wall * rng.uniform(0.72, 0.88), shade=vert)
    floor = [(-hw, 0, 0), (hw, 0, 0), (hw, 0, depth), (-hw, 0, depth)]
    m = cv.mask(floor)
    if m is not None:
        tex = _floor_texture(cv, rng, width, depth)
        cv.rgb = cv.rgb * (1 - m[..., None]) + tex * m[..., None]
    # Skirting board along the back wall.
    cv.paint([(-hw, 0, depth), (hw, 0, depth), (hw, 0.08, depth), (-hw, 0.08, depth)],
             wall * 0.8 if rng.random() < 0.5 else np.array([0.92, 0.92, 0.9]))

    bed_w = rng.uniform(1.4, 1.9)
    bed_l = rng.uniform(1.9, 2.2)
    bed_x = rng.uniform(-hw + bed_w / 2 + 0.1, hw - bed_w / 2 - 0.1)
    bx0, bx1 = bed_x - bed_w / 2, bed_x + bed_w / 2
    bz0 = depth - bed_l
    side = 1.0 if rng.random() < 0.5 else -1.0  # where the window goes: away from the bed
    win_free = (bx1, hw) if bed_x < 0 else (-hw, bx0)

    # Window on the back wall (or a side wall), sky gradient and frame.
    sky_top = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.3, 0.7), rng.uniform(0.75, 1.0))
    if rng.random() < 0.15:  # dusk
        sky_top = _hsv(rng.uniform(0.62, 0.7), 0.5, rng.uniform(0.3, 0.5))
    sky_low = np.clip(sky_top * 1.15 + 0.12, 0, 1)
    frame_col = np.array([0.95, 0.95, 0.93]) * rng.uniform(0.85, 1.0)
    if rng.random() < 0.35:
        frame_col = _hsv(rng.uniform(0.05, 0.1), 0.5, rng.uniform(0.3, 0.55))
    wy0, wy1 = rng.uniform(0.8, 1.0), rng.uniform(2.0, min(2.4, height - 0.15))
    if win_free[1] - win_free[0] > 0.9 and rng.random() < 0.6:
        ww = rng.uniform(0.7, min(1.6, win_free[1] - win_free[0] - 0.2))
        wx = rng.uniform(win_free[0] + 0.1, win_free[1] - ww - 0.1)
        z = depth - 0.001
        outer = [(wx - 0.07, wy0 - 0.07, z), (wx + ww + 0.07, wy0 - 0.07, z),
                 (wx + ww + 0.07, wy1 + 0.07, z), (wx - 0.07, wy1 + 0.07, z)]
        inner = [(wx, wy0, z), (wx + ww, wy0, z), (wx + ww, wy1, z), (wx, wy1, z)]
        mull = [(wx + ww / 2 - 0.03, wy0, z), (wx + ww / 2 + 0.03, wy0, z),
                (wx + ww / 2 + 0.03, wy1, z), (wx + ww / 2 - 0.03, wy1, z)]
    else:
        xw = side * (hw - 0.001)
        z0 = rng.uniform(0.6, depth - 2.2)
        z1 = z0 + rng.uniform(1.0, 1.8)
        outer = [(xw, wy0 - 0.07, z0 - 0.07), (xw, wy0 - 0.07, z1 + 0.07),
                 (xw, wy1 + 0.07, z1 + 0.07), (xw, wy1 + 0.07, z0 - 0.07)]
        inner = [(xw, wy0, z0), (xw, wy0, z1), (xw, wy1, z1), (xw, wy1, z0)]
        zm = (z0 + z1) / 2
        mull = [(xw, wy0, zm - 0.03), (xw, wy0, zm + 0.03), (xw, wy1, zm + 0.03),
                (xw, wy1, zm - 0.03)]
    cv.paint(outer, frame_col)
    m_sky = cv.paint(inner, sky_low, noise=0.01)
    if m_sky is not None:  # vertical sky gradient inside the window
        vmin, vmax = np.where(m_sky > 0.5, cv.v, 2).min(), np.where(m_sky > 0.5, cv.v, -1).max()
        tt = np.clip((cv.v - vmin) / max(vmax - vmin, 1e-3), 0, 1)[..., None]
        grad = sky_top * (1 - tt) + sky_low * tt
        cv.rgb = cv.rgb * (1 - m_sky[..., None]) + grad * m_sky[..., None]
        if rng.random() < 0.6:
            cv.paint(mull, frame_col)

    # Picture above the bed.
    if rng.random() < 0.6:
        pw, ph = rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.6)
        py0 = rng.uniform(1.35, 1.6)
        z = depth - 0.002
        px0 = bed_x - pw / 2 + rng.uniform(-0.2, 0.2)
        cv.paint([(px0 - 0.04, py0 - 0.04, z), (px0 + pw + 0.04, py0 - 0.04, z),
                  (px0 + pw + 0.04, py0 + ph + 0.04, z), (px0 - 0.04, py0 + ph + 0.04, z)],
                 _hsv(0.08, 0.4, rng.uniform(0.1, 0.6)))
        cv.paint([(px0, py0, z), (px0 + pw, py0, z), (px0 + pw, py0 + ph, z), (px0, py0 + ph, z)],
                 _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.4, 0.9)),
                 shade=lambda u, v: 0.85 + 0.3 * v, noise=0.04)

    # Rug in front of the bed.
    if rng.random() < 0.5:
        rx = bed_x + rng.uniform(-0.5, 0.5)
        rw, rl = rng.uniform(1.2, 2.2), rng.uniform(0.8, 1.5)
        rz = max(bz0 - rl * 0.4, 0.6)
        y = 0.002
        rug = _hsv(rng.uniform(0, 1), rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.8))
        cv.paint([(rx - rw / 2, y, rz - rl / 2), (rx + rw / 2, y, rz - rl / 2),
                  (rx + rw / 2, y, rz + rl / 2), (rx - rw / 2, y, rz + rl / 2)], rug * 0.75)
        b = 0.1
        cv.paint([(rx - rw / 2 + b, y, rz - rl / 2 + b), (rx + rw / 2 - b, y, rz - rl / 2 + b),
                  (rx + rw / 2 - b, y, rz + rl / 2 - b), (rx - rw / 2 + b, y, rz + rl / 2 - b)],
                 rug, noise=0.04)

    # Soft contact shadow of the bed.
    cv.darken([(bx0 - 0.1, 0, bz0 - 0.25), (bx1 + 0.1, 0, bz0 - 0.25), (bx1 + 0.1, 0, depth),
               (bx0 - 0.1, 0, depth)], amount=0.45, blur=0.02)

    # Bedside table with a lamp, on the side of the bed with more room.
    ns_side = 1.0 if (hw - bx1) > (bx0 + hw) else -1.0
    ns_w = 0.45
    ns_x0 = bx1 + 0.08 if ns_side > 0 else bx0 - 0.08 - ns_w
    has_ns = -hw < ns_x0 and ns_x0 + ns_w < hw
    wood = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.65))
    if rng.random() < 0.3:
        wood = _hsv(0.1, 0.05, rng.uniform(0.75, 0.95))  # white furniture
    ns_after = has_ns and ((ns_side > 0 and cam.pos[0] > bx1) or (ns_side < 0 and cam.pos[0] < bx0))
    lamp_shade = _hsv(rng.uniform(0.08, 0.15), rng.uniform(0.1, 0.5), rng.uniform(0.8, 1.0))

    def nightstand() -> None:
        cv.darken([(ns_x0 - 0.05, 0, depth - 0.55), (ns_x0 + ns_w + 0.05, 0, depth - 0.55),
                   (ns_x0 + ns_w + 0.05, 0, depth), (ns_x0 - 0.05, 0, depth)], 0.4, 0.015)
        cv.box((ns_x0, 0, depth - 0.45), (ns_x0 + ns_w, 0.55, depth), wood)
        lx = ns_x0 + ns_w / 2
        lz = depth - 0.22
        cv.box((lx - 0.04, 0.55, lz - 0.04), (lx + 0.04, 0.78, lz + 0.04), wood * 0.6)
        cv.paint([(lx - 0.16, 0.75, lz - 0.16), (lx + 0.16, 0.75, lz - 0.16),
                  (lx + 0.1, 1.0, lz - 0.1), (lx - 0.1, 1.0, lz - 0.1)], lamp_shade,
                 shade=lambda u, v: 1.05 - 0.1 * v)

    if has_ns and not ns_after:
        nightstand()

    # The bed: headboard, frame, mattress under a blanket, sheet, pillows.
    frame = wood if rng.random() < 0.7 else _hsv(rng.uniform(0, 1), 0.2, rng.uniform(0.3, 0.7))
    blanket = _hsv(rng.uniform(0, 1), rng.uniform(0.15, 0.6), rng.uniform(0.35, 0.9))
    sheet = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.12), rng.uniform(0.85, 0.98))
    head_h = rng.uniform(0.9, 1.3)
    cv.box((bx0 - 0.03, 0, depth - 0.08), (bx1 + 0.03, head_h, depth), frame * 0.9)
    cv.box((bx0, 0, bz0), (bx1, 0.3, depth - 0.08), frame)
    fold = rng.uniform(0.55, 0.75)
    bl_z1 = bz0 + bed_l * fold
    cv.box((bx0 + 0.02, 0.3, bl_z1), (bx1 - 0.02, 0.52, depth - 0.08), sheet * 0.95)
    cv.box((bx0 - 0.02, 0.22, bz0 - 0.02), (bx1 + 0.02, 0.55, bl_z1), blanket,
           top=blanket * 1.05, noise=0.03)
    cv.paint([(bx0 - 0.02, 0.555, bl_z1 - 0.18), (bx1 + 0.02, 0.555, bl_z1 - 0.18),
              (bx1 + 0.02, 0.555, bl_z1), (bx0 - 0.02, 0.555, bl_z1)],
             np.clip(sheet * 1.02, 0, 1))  # turned-down sheet edge
    n_pillows = 2 if bed_w > 1.55 else 1
    pw = (bed_w - 0.2) / n_pillows
    for i in range(n_pillows):
        px0 = bx0 + 0.1 + i * pw
        cv.box((px0 + 0.03, 0.52, depth - 0.55), (px0 + pw - 0.03, 0.66, depth - 0.12),
               sheet, top=np.clip(sheet * 1.03, 0, 1))

    if ns_after:
        nightstand()
    if has_ns:  # warm lamp glow
        lx = ns_x0 + ns_w / 2
        p = cam.to_camera(np.array([[lx, 0.9, depth - 0.22]]))[0]
        if p[2] > 0.1:
            (gx, gy), = cam.project(p[None])
            r2 = ((cv.u * res - gx) ** 2 + (cv.v * res - gy) ** 2) / (0.25 * res) ** 2
            glow = rng.uniform(0.08, 0.2) * np.exp(-r2)
            cv.rgb += glow[..., None] * np.array([1.0, 0.85, 0.55])

    # Global illumination: gentle vignette, brightness jitter, fine noise.
    vignette = 1 - 0.25 * ((cv.u - 0.5) ** 2 + (cv.v - 0.5) ** 2)
    cv.rgb *= vignette[..., None] * rng.uniform(0.85, 1.1)
    img = Image.fromarray(np.clip(cv.rgb * 255, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 1.5, size=(size, size, 1)).round()
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of an image; deterministic (no timestamps or text chunks)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_demo_data(out: str, n: int, *, size: int = 64, shard_size: int = 256, seed: int = 0,
                    storage_options: Mapping[str, Any] | None = None,
                    strokes: bool = False) -> list[str]:
    """Write `n` random rooms as WebDataset shards `{out}/rooms-000000.tar`, ... (any fsspec URL).

    Each sample is one member `{key}.png` (RGB, `size` x `size`) with key `room_0000123`.
    Image i is rendered from `numpy.random.default_rng([seed, i])`, so the same seed gives
    byte-identical shards, and a shard's content does not depend on `shard_size` of others.
    With `strokes`, `{key}.png` is the room's simulated stroke painting (SDEdit guide) and
    `{key}.target.png` the room itself (for evaluation and previews).

    Returns:
        The URLs of the shards written, in order, spelled like `out`.
    """
    if n < 1:
        raise PipelineError(f"n must be >= 1, got {n}")
    if shard_size < 1:
        raise PipelineError(f"shard_size must be >= 1, got {shard_size}")
    if size < 8:
        raise PipelineError(f"size must be >= 8, got {size}")
    fs, root = fsspec.core.url_to_fs(out, **dict(storage_options or {}))
    root = root.rstrip("/")
    urls: list[str] = []
    try:
        fs.makedirs(root, exist_ok=True)
        for shard, start in enumerate(range(0, n, shard_size)):
            path = f"{root}/rooms-{shard:06d}.tar"
            with fs.open(path, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="", group="",
                                       mode=0o644)
                for i in range(start, min(start + shard_size, n)):
                    img = render_room(np.random.default_rng([seed, i]), size)
                    sample = {"__key__": f"room_{i:07d}", "png": encode_png(img)}
                    if strokes:
                        sample["png"] = encode_png(simulate_strokes(img))
                        sample["target.png"] = encode_png(img)
                    writer.write(sample)
                writer.close()
            url = f"{out.rstrip('/')}/rooms-{shard:06d}.tar"
            urls.append(url)
            logger.info("wrote %s (%d images)", url, min(start + shard_size, n) - start)
    except OSError as e:
        raise StorageError(f"cannot write demo data to {out}: {e}") from e
    return urls
