"""The synthetic corpus's class signatures, one generator per kind of modality.

Every generator takes the sample's label, its modality's noise knob x in [0, 1] and the sample's
random generator. With probability x**2 a modality shows the signature of a uniformly random class
instead of its own (independently per modality), which caps what it alone can reach at
1 - x**2 (K - 1) / K; the rest of the noise (below) makes the signature harder to see. x = 0 is the
clean signature, x = 1 carries no label information.

  * audio: a tone at a class frequency plus its octave, amplitude modulated at a class rate;
    noise: white noise at an SNR falling with x, ~Poisson(2x) quieter distractor tones.
  * frames (alone with audio): a class-coloured, class-shaped sprite moving over a grey
    background; noise: pixel noise of std ~70x, ~Poisson(5x) distractor sprites. With the cue
    "shape" every sprite takes a random class's colour: only the shape says the class, which an
    encoder must learn (a linear probe on untrained features reads colour, not shape).
  * flow (+ frames): the video's luminance is a textured pattern moving in the class direction
    (angle 2 pi k / K); noise: direction jitter, frame-to-frame luminance noise of std ~25x,
    ~Poisson(4x) patches moving in other classes' directions. The frames' signature is then a
    static sprite drawn in chroma only (zero luma), so the grey frames optical flow is computed
    from carry no appearance, and the appearance no motion: each modality has its own signal.
    Frames noise: chroma noise, ~Poisson(5x) chroma distractor sprites.
  * image: one object seen from several sides (view 0 the front, view 1 the rear, mirrored);
    its body is class-independent, the front carries a class emblem (shape and colour), the
    rear class-oriented stripes; noise: pixel noise of std ~70x, ~Poisson(4x) distractor
    emblems or stripe patches.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # BT.601: what a grey conversion (and the codec's Y) keeps


@dataclass(frozen=True)
class Canvas:
    """The corpus's media geometry (from SynthConfig)."""

    classes: int
    width: int
    height: int
    fps: int
    duration_s: float
    sample_rate: int

    @property
    def num_frames(self) -> int:
        return max(1, int(round(self.duration_s * self.fps)))


def shown_class(label: int, classes: int, noise: float, rng: np.random.Generator) -> int:
    """The class whose signature the sample carries: a random one with probability noise**2."""
    return int(rng.integers(classes)) if rng.random() < noise * noise else label


# ---------------------------------------------------------------------------------------
# audio

def tone_frequency(k: int, classes: int) -> float:
    """Class k's fundamental: log-spaced over 300..3000 Hz (octave below 8 kHz, many bins apart)."""
    return 300.0 * 10.0 ** (k / max(classes - 1, 1))


def am_rate(k: int, classes: int) -> float:
    """Class k's amplitude-modulation rate, 1.5..6 Hz, in an order unrelated to pitch."""
    return 1.5 + 4.5 * ((3 * k) % classes) / max(classes - 1, 1)


def _voice(k: int, c: Canvas, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = tone_frequency(k, c.classes) * rng.uniform(0.98, 1.02)          # pitch jitter
    am = am_rate(k, c.classes) * rng.uniform(0.9, 1.1)
    wave = np.zeros_like(t)
    for mult, amp in ((1, 1.0), (2, 0.5)):
        if mult * f < 0.45 * c.sample_rate:   # no aliased partials at low sample rates
            wave += amp * np.sin(2 * np.pi * mult * f * t + rng.uniform(0, 2 * np.pi))
    return wave * (0.6 + 0.4 * np.sin(2 * np.pi * am * t + rng.uniform(0, 2 * np.pi)))


def make_audio(label: int, noise: float, c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 waveform [duration_s * sample_rate] of one sample of class `label`."""
    x = noise
    t = np.arange(int(round(c.duration_s * c.sample_rate))) / c.sample_rate
    wave = _voice(shown_class(label, c.classes, x, rng), c, t, rng)
    for _ in range(rng.poisson(2 * x)):
        wave += rng.uniform(0.3, 0.7) * _voice(int(rng.integers(c.classes)), c, t, rng)
    rms = float(np.sqrt(np.mean(wave ** 2)))
    # noise rms / signal rms: 0.01 (40 dB SNR) at x=0, 2.5 (-8 dB) at x=0.5, 10 (-20 dB) at x=1
    wave += rng.standard_normal(t.size) * rms * (0.01 + 10 * x * x)
    wave *= rng.uniform(0.3, 0.9) / np.abs(wave).max()                     # loudness
    return wave.astype(np.float32)


# ---------------------------------------------------------------------------------------
# shapes and colours

def class_colour(k: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Class k's colour (hues evenly spaced, jittered by less than half a step), RGB 0..255."""
    hue = (k + rng.uniform(-0.2, 0.2)) / classes % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    return np.array(rgb, np.float32) * 255


FRAMES_CUES = ("colour", "shape")   # what of the frames' sprite carries the class: colour and shape, or shape only


def sprite_colour(k: int, classes: int, cue: str, rng: np.random.Generator) -> np.ndarray:
    """Class k's colour, or (cue "shape") a uniformly random class's: the colour then says nothing."""
    return class_colour(k if cue == "colour" else int(rng.integers(classes)), classes, rng)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.8 * r
    if shape == "triangle":
        return (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        return ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r))
    return ax + ay <= r   # diamond


def _grid(c: Canvas) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:c.height, 0:c.width].astype(np.float32)
    return yy, xx


# ---------------------------------------------------------------------------------------
# frames: a moving sprite (the audio-visual setting)

def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions over time of a point moving at speed v, reflected at lo and hi."""
    span = hi - lo
    p = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(p > span, 2 * span - p, p)


class _Sprite:
    """A class-coloured shape moving on a straight line, bouncing off the frame edges."""

    def __init__(self, k: int, r: float, c: Canvas, t: np.ndarray, rng: np.random.Generator, cue: str = "colour"):
        self.shape = SHAPES[k % len(SHAPES)]
        self.colour = sprite_colour(k, c.classes, cue, rng)
        self.r = r
        speed, angle = rng.uniform(0.2, 0.6) * c.width, rng.uniform(0, 2 * np.pi)
        self.x = _bounce(rng.uniform(r, c.width - r), speed * np.cos(angle), t, r, c.width - r)
        self.y = _bounce(rng.uniform(r, c.height - r), speed * np.sin(angle), t, r, c.height - r)

    def draw(self, frame: np.ndarray, i: int, xx: np.ndarray, yy: np.ndarray) -> None:
        frame[shape_mask(self.shape, xx - self.x[i], yy - self.y[i], self.r)] = self.colour


def make_frames(label: int, noise: float, c: Canvas, rng: np.random.Generator, cue: str = "colour") -> np.ndarray:
    """RGB frames uint8 [num_frames, height, width, 3]: a class sprite moving over a grey background."""
    y = noise
    n = c.num_frames
    t = np.arange(n) / c.fps
    yy, xx = _grid(c)
    r = 0.22 * c.height * rng.uniform(0.85, 1.15)   # ~10 px after a resize to 64x64
    main = _Sprite(shown_class(label, c.classes, y, rng), r, c, t, rng, cue)
    clutter = [_Sprite(int(rng.integers(c.classes)), r * rng.uniform(0.5, 1.0), c, t, rng, cue)
               for _ in range(rng.poisson(5 * y))]
    layers = clutter + [main]
    rng.shuffle(layers)   # the main shape is sometimes hidden behind clutter
    background = rng.uniform(30, 110) + rng.normal(0, 6, (c.height, c.width, 1))
    frames = np.empty((n, c.height, c.width, 3), np.float32)
    for i in range(n):
        frames[i] = background
        for sprite in layers:
            sprite.draw(frames[i], i, xx, yy)
    if y > 0:
        frames += rng.standard_normal(frames.shape, dtype=np.float32) * (70 * y)
    return np.clip(frames, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# flow: a textured pattern moving in the class direction (+ the frames' chroma sprite)

def flow_direction(k: int, classes: int) -> float:
    """Class k's motion direction (radians, image x right and y down)."""
    return 2 * np.pi * k / classes


def _texture_spectrum(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """FFT of a periodic, band-limited random texture (blobs ~12 px across), unit std once inverted."""
    fy = np.fft.fftfreq(c.height)[:, None]
    fx = np.fft.fftfreq(c.width)[None, :]
    spectrum = np.fft.fft2(rng.standard_normal((c.height, c.width))) * np.exp(-(fx * fx + fy * fy) / 0.08 ** 2)
    std = np.fft.ifft2(spectrum).real.std()
    return spectrum / max(std, 1e-6)


def _shifted(spectrum: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """The texture moved by (sx, sy) pixels (exact subpixel shift of a periodic image)."""
    h, w = spectrum.shape
    ramp = np.exp(-2j * np.pi * (np.fft.fftfreq(w)[None, :] * sx + np.fft.fftfreq(h)[:, None] * sy))
    return np.fft.ifft2(spectrum * ramp).real


def _motion(label: int, noise: float, c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Luminance float32 [n, H, W] around 128: the moving texture carrying the flow signature."""
    x = noise
    n = c.num_frames
    step = 2 * np.pi / c.classes
    angle = flow_direction(shown_class(label, c.classes, x, rng), c.classes) + rng.uniform(-0.3, 0.3) * x * step
    speed = rng.uniform(1.5, 3.0) * c.width / 128                              # pixels per frame
    vx, vy = speed * np.cos(angle), speed * np.sin(angle)
    base = _texture_spectrum(c, rng)
    luma = np.stack([_shifted(base, vx * i, vy * i) for i in range(n)])
    yy, xx = _grid(c)
    for _ in range(rng.poisson(4 * x)):   # patches whose texture moves another class's way
        other = flow_direction(int(rng.integers(c.classes)), c.classes)
        s = rng.uniform(1.5, 3.0) * c.width / 128
        patch = _texture_spectrum(c, rng)
        r = rng.uniform(0.12, 0.25) * c.height
        inside = (xx - rng.uniform(0, c.width)) ** 2 + (yy - rng.uniform(0, c.height)) ** 2 <= r * r
        for i in range(n):
            luma[i][inside] = _shifted(patch, s * np.cos(other) * i, s * np.sin(other) * i)[inside]
    luma = 128 + 25 * luma.astype(np.float32)
    if x > 0:
        luma += rng.standard_normal(luma.shape, dtype=np.float32) * (25 * x)
    return luma


def _chroma(colour: np.ndarray) -> np.ndarray:
    """A colour's zero-luma part (what remains after removing its grey level)."""
    return colour - float(colour @ LUMA)


def _appearance(label: int, noise: float, c: Canvas, rng: np.random.Generator, cue: str = "colour") -> np.ndarray:
    """Chroma float32 [H, W, 3] of zero luma: a static class sprite (shape and colour) plus clutter."""
    y = noise
    yy, xx = _grid(c)
    out = np.zeros((c.height, c.width, 3), np.float32)
    r = 0.25 * c.height * rng.uniform(0.85, 1.15)
    k = shown_class(label, c.classes, y, rng)
    main = (k, r, rng.uniform(r, c.width - r), rng.uniform(r, c.height - r), sprite_colour(k, c.classes, cue, rng))
    clutter = []
    for _ in range(rng.poisson(5 * y)):
        j, rr = int(rng.integers(c.classes)), r * rng.uniform(0.5, 1.0)
        clutter.append((j, rr, rng.uniform(0, c.width), rng.uniform(0, c.height), sprite_colour(j, c.classes, cue, rng)))
    layers = clutter + [main]
    rng.shuffle(layers)
    for j, rr, cx, cy, colour in layers:
        out[shape_mask(SHAPES[j % len(SHAPES)], xx - cx, yy - cy, rr)] = 0.45 * _chroma(colour)
    if y > 0:
        noise_rgb = rng.standard_normal(out.shape, dtype=np.float32) * (40 * y)
        out += noise_rgb - (noise_rgb @ LUMA)[..., None]
    return out


def make_motion_frames(label: int, flow_noise: float, frames_noise: float | None, c: Canvas,
                       rng: np.random.Generator, cue: str = "colour") -> np.ndarray:
    """RGB frames uint8 [n, H, W, 3]: luminance moving in the flow class's direction, and (when the
    setting has a frames modality, frames_noise not None) a static chroma sprite of the frames class."""
    rgb = np.repeat(_motion(label, flow_noise, c, rng)[..., None], 3, axis=-1)
    if frames_noise is not None:
        rgb += _appearance(label, frames_noise, c, rng, cue)[None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# image: one object, several views

@dataclass(frozen=True)
class Body:
    """The class-independent object every view shows: an ellipse with a grey shade and a light direction."""

    cx: float
    cy: float
    rx: float
    ry: float
    shade: float
    light: float
    background: float


def make_body(c: Canvas, rng: np.random.Generator) -> Body:
    rx, ry = rng.uniform(0.28, 0.4) * c.width, rng.uniform(0.32, 0.45) * c.height
    return Body(rng.uniform(0.45, 0.55) * c.width, rng.uniform(0.45, 0.55) * c.height, rx, ry,
                rng.uniform(90, 170), rng.uniform(0, 2 * np.pi), rng.uniform(20, 60))


def _stripes(k: int, classes: int, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class k's stripes: a square wave oriented at angle pi k / K, random period and phase; 0/1 float."""
    angle = np.pi * k / classes + rng.uniform(-0.15, 0.15) * np.pi / classes
    period = rng.uniform(8, 12)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    return (np.mod(u / period + rng.uniform(0, 1), 1.0) < 0.5).astype(np.float32)


def _signature(family: int, k: int, c: Canvas, canvas: np.ndarray, where: np.ndarray, cx: float, cy: float,
               size: float, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> None:
    """Draw class k's signature of a family (0: emblem of a shape and colour; 1: oriented stripes) into `where`."""
    if family == 0:
        mask = where & shape_mask(SHAPES[k % len(SHAPES)], xx - cx, yy - cy, size)
        canvas[mask] = class_colour(k, c.classes, rng)
    else:
        tone = rng.uniform(0.7, 1.0) * np.array(colorsys.hsv_to_rgb(rng.uniform(), 0.3, 1.0), np.float32) * 255
        on = _stripes(k, c.classes, xx, yy, rng)[..., None]
        canvas[where] = (on * tone + (1 - on) * 0.35 * canvas)[where]   # light stripes on the darkened surface


def make_view(view: int, body: Body, label: int, noise: float, c: Canvas, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the object seen from view `view` (odd views from behind: mirrored body);
    even views carry an emblem of the class, odd views its stripes (views past 1 shift the class)."""
    x = noise
    yy, xx = _grid(c)
    cx = body.cx if view % 2 == 0 else c.width - body.cx
    light = body.light if view % 2 == 0 else np.pi - body.light
    img = np.empty((c.height, c.width, 3), np.float32)
    img[:] = body.background + 20 * (yy / c.height)[..., None]
    inside = ((xx - cx) / body.rx) ** 2 + ((yy - body.cy) / body.ry) ** 2 <= 1
    shading = 1 + 0.25 * (((xx - cx) * np.cos(light) + (yy - body.cy) * np.sin(light)) / body.rx)
    img[inside] = (body.shade * shading)[inside][:, None]
    family, shift = view % 2, view // 2
    k = (shown_class(label, c.classes, x, rng) + shift) % c.classes
    _signature(family, k, c, img, inside, cx, body.cy, 0.55 * min(body.rx, body.ry), xx, yy, rng)
    for _ in range(rng.poisson(4 * x)):   # distractors of random classes, anywhere
        j = int(rng.integers(c.classes))
        px, py, size = rng.uniform(0, c.width), rng.uniform(0, c.height), rng.uniform(0.1, 0.2) * c.height
        patch = (xx - px) ** 2 + (yy - py) ** 2 <= (1.3 * size) ** 2
        _signature(family, j, c, img, patch, px, py, size, xx, yy, rng)
    if x > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * (70 * x)
    return np.clip(img, 0, 255).astype(np.uint8)
