"""The built-in procedural image domain "rooms": tiny bedroom-like scenes.

A room is a box seen by a pinhole camera: walls, a textured floor, a bed, a bedside table with a
lamp, a window, sometimes a picture and a rug, with random colours, placement and camera, drawn
with PIL polygons supersampled for anti-aliasing. Each part has its own function, drawn in a
fixed order: the order of the random draws defines the data set the bundled model was trained on."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.tools.scene import Camera, Canvas, Shade

__all__ = ["render_room"]



def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """An RGB colour, shape (3,), float in [0, 1], from hue / saturation / value in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def _floor_texture(canvas: Canvas, rng: np.random.Generator, width: float,
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


@dataclass(frozen=True)
class _Room:
    """The room's box and the bed's footprint (metres; x right, y up, z away from the camera)."""

    width: float
    depth: float
    height: float
    bed_x: float
    bed_w: float
    bed_l: float

    @property
    def hw(self) -> float:
        return self.width / 2

    @property
    def bx0(self) -> float:
        return self.bed_x - self.bed_w / 2

    @property
    def bx1(self) -> float:
        return self.bed_x + self.bed_w / 2

    @property
    def bz0(self) -> float:
        return self.depth - self.bed_l


def _walls_and_floor(cv: Canvas, rng: np.random.Generator, width: float, depth: float,
                     height: float) -> None:
    """Ceiling, back and side walls (shaded darker towards the floor), floor, skirting board."""
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


def _window(cv: Canvas, rng: np.random.Generator, room: _Room) -> None:
    """A window away from the bed, on the back wall or a side wall: sky gradient and frame."""
    hw, depth, height = room.hw, room.depth, room.height
    side = 1.0 if rng.random() < 0.5 else -1.0  # the side wall used when the back has no room
    win_free = (room.bx1, hw) if room.bed_x < 0 else (-hw, room.bx0)
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


def _picture(cv: Canvas, rng: np.random.Generator, room: _Room) -> None:
    """Sometimes a framed picture on the back wall above the bed."""
    if rng.random() >= 0.6:
        return
    pw, ph = rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.6)
    py0 = rng.uniform(1.35, 1.6)
    z = room.depth - 0.002
    px0 = room.bed_x - pw / 2 + rng.uniform(-0.2, 0.2)
    cv.paint([(px0 - 0.04, py0 - 0.04, z), (px0 + pw + 0.04, py0 - 0.04, z),
              (px0 + pw + 0.04, py0 + ph + 0.04, z), (px0 - 0.04, py0 + ph + 0.04, z)],
             _hsv(0.08, 0.4, rng.uniform(0.1, 0.6)))
    cv.paint([(px0, py0, z), (px0 + pw, py0, z), (px0 + pw, py0 + ph, z), (px0, py0 + ph, z)],
             _hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.4, 0.9)),
             shade=lambda u, v: 0.85 + 0.3 * v, noise=0.04)


def _rug(cv: Canvas, rng: np.random.Generator, room: _Room) -> None:
    """Sometimes a rug with a border on the floor in front of the bed."""
    if rng.random() >= 0.5:
        return
    rx = room.bed_x + rng.uniform(-0.5, 0.5)
    rw, rl = rng.uniform(1.2, 2.2), rng.uniform(0.8, 1.5)
    rz = max(room.bz0 - rl * 0.4, 0.6)
    y = 0.002
    rug = _hsv(rng.uniform(0, 1), rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.8))
    cv.paint([(rx - rw / 2, y, rz - rl / 2), (rx + rw / 2, y, rz - rl / 2),
              (rx + rw / 2, y, rz + rl / 2), (rx - rw / 2, y, rz + rl / 2)], rug * 0.75)
    b = 0.1
    cv.paint([(rx - rw / 2 + b, y, rz - rl / 2 + b), (rx + rw / 2 - b, y, rz - rl / 2 + b),
              (rx + rw / 2 - b, y, rz + rl / 2 - b), (rx - rw / 2 + b, y, rz + rl / 2 - b)],
             rug, noise=0.04)


def _nightstand(cv: Canvas, room: _Room, x0: float, wood: np.ndarray,
                lamp_shade: np.ndarray) -> None:
    """A bedside table at x0 (0.45 m wide) against the back wall, with a lamp on it."""
    depth, w = room.depth, 0.45
    cv.darken([(x0 - 0.05, 0, depth - 0.55), (x0 + w + 0.05, 0, depth - 0.55),
               (x0 + w + 0.05, 0, depth), (x0 - 0.05, 0, depth)], 0.4, 0.015)
    cv.box((x0, 0, depth - 0.45), (x0 + w, 0.55, depth), wood)
    lx = x0 + w / 2
    lz = depth - 0.22
    cv.box((lx - 0.04, 0.55, lz - 0.04), (lx + 0.04, 0.78, lz + 0.04), wood * 0.6)
    cv.paint([(lx - 0.16, 0.75, lz - 0.16), (lx + 0.16, 0.75, lz - 0.16),
              (lx + 0.1, 1.0, lz - 0.1), (lx - 0.1, 1.0, lz - 0.1)], lamp_shade,
             shade=lambda u, v: 1.05 - 0.1 * v)


def _bed(cv: Canvas, rng: np.random.Generator, room: _Room, wood: np.ndarray) -> None:
    """The bed: headboard, frame, mattress under a blanket, turned-down sheet, pillows."""
    bx0, bx1, bz0, depth = room.bx0, room.bx1, room.bz0, room.depth
    frame = wood if rng.random() < 0.7 else _hsv(rng.uniform(0, 1), 0.2, rng.uniform(0.3, 0.7))
    blanket = _hsv(rng.uniform(0, 1), rng.uniform(0.15, 0.6), rng.uniform(0.35, 0.9))
    sheet = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.12), rng.uniform(0.85, 0.98))
    head_h = rng.uniform(0.9, 1.3)
    cv.box((bx0 - 0.03, 0, depth - 0.08), (bx1 + 0.03, head_h, depth), frame * 0.9)
    cv.box((bx0, 0, bz0), (bx1, 0.3, depth - 0.08), frame)
    fold = rng.uniform(0.55, 0.75)
    bl_z1 = bz0 + room.bed_l * fold
    cv.box((bx0 + 0.02, 0.3, bl_z1), (bx1 - 0.02, 0.52, depth - 0.08), sheet * 0.95)
    cv.box((bx0 - 0.02, 0.22, bz0 - 0.02), (bx1 + 0.02, 0.55, bl_z1), blanket,
           top=blanket * 1.05, noise=0.03)
    cv.paint([(bx0 - 0.02, 0.555, bl_z1 - 0.18), (bx1 + 0.02, 0.555, bl_z1 - 0.18),
              (bx1 + 0.02, 0.555, bl_z1), (bx0 - 0.02, 0.555, bl_z1)],
             np.clip(sheet * 1.02, 0, 1))  # turned-down sheet edge
    n_pillows = 2 if room.bed_w > 1.55 else 1
    pw = (room.bed_w - 0.2) / n_pillows
    for i in range(n_pillows):
        px0 = bx0 + 0.1 + i * pw
        cv.box((px0 + 0.03, 0.52, depth - 0.55), (px0 + pw - 0.03, 0.66, depth - 0.12),
               sheet, top=np.clip(sheet * 1.03, 0, 1))


def _furniture(cv: Canvas, rng: np.random.Generator, room: _Room) -> None:
    """Bed and bedside table in painter's order, then the lamp's glow."""
    hw, bx0, bx1, cam = room.hw, room.bx0, room.bx1, cv.cam
    ns_side = 1.0 if (hw - bx1) > (bx0 + hw) else -1.0
    ns_x0 = bx1 + 0.08 if ns_side > 0 else bx0 - 0.08 - 0.45
    has_ns = -hw < ns_x0 and ns_x0 + 0.45 < hw
    wood = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.65))
    if rng.random() < 0.3:
        wood = _hsv(0.1, 0.05, rng.uniform(0.75, 0.95))  # white furniture
    ns_after = has_ns and ((ns_side > 0 and cam.pos[0] > bx1) or (ns_side < 0 and cam.pos[0] < bx0))
    lamp_shade = _hsv(rng.uniform(0.08, 0.15), rng.uniform(0.1, 0.5), rng.uniform(0.8, 1.0))
    if has_ns and not ns_after:
        _nightstand(cv, room, ns_x0, wood, lamp_shade)
    _bed(cv, rng, room, wood)
    if ns_after:
        _nightstand(cv, room, ns_x0, wood, lamp_shade)
    if has_ns:  # warm lamp glow
        p = cam.to_camera(np.array([[ns_x0 + 0.45 / 2, 0.9, room.depth - 0.22]]))[0]
        if p[2] > 0.1:
            (gx, gy), = cam.project(p[None])
            r2 = ((cv.u * cv.res - gx) ** 2 + (cv.v * cv.res - gy) ** 2) / (0.25 * cv.res) ** 2
            glow = rng.uniform(0.08, 0.2) * np.exp(-r2)
            cv.rgb += glow[..., None] * np.array([1.0, 0.85, 0.55])


def render_room(rng: np.random.Generator, size: int) -> Image.Image:
    """One random room, an RGB image of `size` x `size` (>= 8), determined by `rng`'s state."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    res = size * max(2, math.ceil(256 / size))
    width, depth, height = rng.uniform(3.4, 4.8), rng.uniform(3.4, 4.6), rng.uniform(2.5, 2.9)
    cam = Camera(pos=(rng.uniform(-0.6, 0.6) * width / 4, rng.uniform(1.3, 1.8),
                       rng.uniform(0.1, 0.6)),
                  yaw=math.radians(rng.uniform(-14, 14)), pitch=math.radians(rng.uniform(5, 17)),
                  fov_deg=rng.uniform(62, 78), res=res)
    cv = Canvas(cam, rng)
    _walls_and_floor(cv, rng, width, depth, height)
    bed_w = rng.uniform(1.4, 1.9)
    bed_l = rng.uniform(1.9, 2.2)
    hw = width / 2
    room = _Room(width, depth, height, rng.uniform(-hw + bed_w / 2 + 0.1, hw - bed_w / 2 - 0.1),
                 bed_w, bed_l)
    _window(cv, rng, room)
    _picture(cv, rng, room)
    _rug(cv, rng, room)
    # Soft contact shadow of the bed.
    cv.darken([(room.bx0 - 0.1, 0, room.bz0 - 0.25), (room.bx1 + 0.1, 0, room.bz0 - 0.25),
               (room.bx1 + 0.1, 0, depth), (room.bx0 - 0.1, 0, depth)], amount=0.45, blur=0.02)
    _furniture(cv, rng, room)
    # Global illumination: gentle vignette, brightness jitter, fine noise.
    vignette = 1 - 0.25 * ((cv.u - 0.5) ** 2 + (cv.v - 0.5) ** 2)
    cv.rgb *= vignette[..., None] * rng.uniform(0.85, 1.1)
    img = Image.fromarray(np.clip(cv.rgb * 255, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 1.5, size=(size, size, 1)).round()
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
