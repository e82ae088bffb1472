"""Media decoding: a sample's source files -> one array per modality, the model's inputs.

This module is the single entry point for decoding and preprocessing. Training (through the
dataset cache), export parity checks, serving and batch scoring all call `decode_sample` (or
`decode_clip` for a lone video), so a model never sees differently prepared inputs at train and
at serve time. What each kind of modality does with its source lives in that kind's `decode`
(dimml/modalities/<kind>.py), built from the shared helpers here: opening a source with every
failure turned into a MediaError, reading metadata, checking limits before decoding, decoding
and resampling audio, the log spectrogram, and picking video frames.

Sources are keyed by field (`PreprocessConfig.fields`): "video" for the video-derived kinds
(audio, frames, flow), and a modality's own name for a file of its own (an image; or, replacing
the video for that one modality, e.g. CREMA-D's separate audio file).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import av
import numpy as np
import scipy.signal

from dimml.modalities import VIDEO_FIELD, Limits, PreprocessConfig

if TYPE_CHECKING:
    from dimml.modalities.audio import AudioParams

Source = str | os.PathLike | bytes | BinaryIO

# Seek instead of decoding forward when the next wanted frame is this far ahead (seconds):
# below it, decoding through is cheaper than a seek back to the previous keyframe.
SEEK_GAP_S = 2.0
# A stream that runs out before this share of the duration its container declares (and at least
# SHORT_MIN_S early) is reported as cut short (a truncated download). Looser would flag normal
# files: an audio track a little longer than the video sets a container duration the video never reaches.
SHORT_FRACTION = 0.75
SHORT_MIN_S = 0.5

# FFmpeg threads per video decoder, frame scaler and audio filter graph (set_codec_threads): 0 lets FFmpeg
# choose, which suits a lone decode (a 10 s 1080p clip in 22-24% less time on 2 cores); 1 decodes on the
# calling thread, which suits a process decoding many files at once (the service's API worker).
_codec_threads = 0


def set_codec_threads(n: int) -> None:
    """FFmpeg's threads per video decoder, frame scaler and audio filter graph here (0: FFmpeg's choice).

    A process decoding several files at once gains nothing from FFmpeg's own threads (the cores are
    already busy: 4 decode threads on 2 cores ran 24-29% more decodes/s with 1) and FFmpeg starts and
    stops them for every file (~8 for an upload of audio and two frames), churning threads and memory.
    """
    global _codec_threads
    if n < 0:
        raise ValueError(f"codec threads must be >= 0 (0: FFmpeg's choice), got {n}")
    _codec_threads = n


class MediaError(ValueError):
    """A media file that cannot become model input. `cause` is one of CAUSES."""

    CAUSES = ("missing", "empty", "not_media", "undecodable", "no_audio", "no_video",
              "too_long", "too_large")

    def __init__(self, name: str, cause: str, detail: str):
        assert cause in self.CAUSES, cause
        self.name, self.cause, self.detail = name, cause, detail
        super().__init__(f"{name}: {detail}")


@dataclass
class StreamInfo:
    """What a stream's metadata says, before any decoding."""

    index: int
    kind: str                      # "audio" | "video"
    codec: str
    duration_s: float | None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass
class MediaInfo:
    """Container-level metadata of one source, and what decoding it found wrong."""

    name: str
    format: str
    duration_s: float | None
    streams: list[StreamInfo] = field(default_factory=list)
    # decoded anyway, but not what the file should hold: frames the decoder flagged as damaged, a
    # stream that ends far before its declared duration (one line each; empty for a clean file)
    damage: list[str] = field(default_factory=list)

    def first(self, kind: str) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == kind), None)


@dataclass
class Clip:
    """Decoded model inputs of one sample: an array per present modality, metadata per source field."""

    arrays: dict[str, np.ndarray]     # modality name -> array (spec.shape, spec.dtype); present ones, cfg order
    infos: dict[str, MediaInfo]       # source field ("video" or a modality's own file) -> its metadata
    # modality name -> why it is absent (allow_missing): no source ("missing") or the kind's missing cause
    missing: dict[str, MediaError] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the modalities present, in the config's order."""
        return tuple(self.arrays)

    @property
    def name(self) -> str:
        """The first source's name (the video's when there is one)."""
        return next(iter(self.infos.values())).name if self.infos else "<sample>"

    @property
    def warnings(self) -> list[str]:
        """"<file>: <what is wrong>" for every damage decoding found (empty for clean files)."""
        return [f"{info.name}: {d}" for info in self.infos.values() for d in info.damage]


# ---------------------------------------------------------------------------------------
# opening, probing and limits

def source_name(src: Source | None, name: str | None = None) -> str:
    """A display name for a source: the given name, else its path, else its file name, else "<upload>"."""
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "name", None) or "<upload>"


def as_limits(x: Limits | PreprocessConfig | None) -> Limits:
    """The limits of a config (or the limits themselves; defaults for None)."""
    if isinstance(x, PreprocessConfig):
        return x.limits
    return x if x is not None else Limits()


def read_bytes(src: Source, name: str) -> bytes:
    """A source's whole content, with the same errors as open_media (missing, empty)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise MediaError(name, "missing", "no such file")
        with open(path, "rb") as f:
            data = f.read()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        src.seek(0)
        data = src.read()
    if not data:
        raise MediaError(name, "empty", "empty file (0 bytes)")
    return data


def open_media(src: Source, name: str) -> av.container.InputContainer:
    """Open a container, turning every failure into a MediaError naming the file."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise MediaError(name, "missing", "no such file")
        if os.path.getsize(path) == 0:
            raise MediaError(name, "empty", "empty file (0 bytes)")
        target: object = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise MediaError(name, "empty", "empty file (0 bytes)")
        target = io.BytesIO(bytes(src))
    else:
        src.seek(0)
        target = src
    try:
        return av.open(target, mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        raise MediaError(name, "not_media", f"not a decodable media file ({e.strerror or e})") from None


def _is_cover_art(stream: av.stream.Stream) -> bool:
    """An embedded picture (mp3 album art) is not a video modality."""
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def video_stream(c: av.container.InputContainer):
    """The first video stream that is not cover art, or None."""
    return next((s for s in c.streams.video if not _is_cover_art(s)), None)


def audio_stream(c: av.container.InputContainer):
    """The first audio stream, or None."""
    return c.streams.audio[0] if c.streams.audio else None


def _stream_duration(s: av.stream.Stream) -> float | None:
    if s.duration is not None and s.time_base is not None:
        return float(s.duration * s.time_base)
    return None


def container_info(c: av.container.InputContainer, name: str) -> MediaInfo:
    """Metadata of an open container (no decoding)."""
    streams = []
    v = video_stream(c)
    for s in c.streams:
        if s.type == "video" and s is v:
            fps = s.average_rate or s.guessed_rate
            streams.append(StreamInfo(s.index, "video", s.codec_context.name, _stream_duration(s),
                                      width=s.codec_context.width, height=s.codec_context.height,
                                      fps=float(fps) if fps else None))
        elif s.type == "audio":
            cc = s.codec_context
            streams.append(StreamInfo(s.index, "audio", cc.name, _stream_duration(s),
                                      sample_rate=cc.sample_rate, channels=cc.channels))
    duration = c.duration / av.time_base if c.duration is not None else None
    if duration is None:
        known = [s.duration_s for s in streams if s.duration_s is not None]
        duration = max(known) if known else None
    return MediaInfo(name, c.format.name, duration, streams)


def check_limits(info: MediaInfo, limits: Limits) -> None:
    """Refuse over-long or over-large media from metadata alone, before decoding anything."""
    if info.duration_s is not None and info.duration_s > limits.max_duration_s:
        raise MediaError(info.name, "too_long",
                         f"duration {info.duration_s:.1f} s exceeds the maximum {limits.max_duration_s:g} s")
    v = info.first("video")
    if v is not None and v.width and v.height and v.width * v.height > limits.max_pixels:
        raise MediaError(info.name, "too_large",
                         f"frame size {v.width}x{v.height} exceeds the maximum of {limits.max_pixels} pixels")


def checked_info(c: av.container.InputContainer, name: str, limits: Limits) -> MediaInfo:
    """container_info, refusing a file without audio or video and one over the limits."""
    info = container_info(c, name)
    if not info.streams:
        raise MediaError(name, "not_media", "no audio or video stream")
    check_limits(info, limits)
    return info


def probe(src: Source, limits: Limits | PreprocessConfig | None = None, *, name: str | None = None) -> MediaInfo:
    """Read a file's stream metadata and check it against the limits (a config's, or defaults); decodes nothing."""
    name = source_name(src, name)
    with open_media(src, name) as c:
        return checked_info(c, name, as_limits(limits))


# ---------------------------------------------------------------------------------------
# audio

def fit_waveform(wave: np.ndarray, p: AudioParams) -> np.ndarray:
    """Tile a short waveform / crop a long one to p.num_samples and clip to [-1, 1].

    As the reference code does (np.tile(samples, k)[:n]; values clipped to [-1, 1]); we tile
    as often as needed, so clips shorter than duration / k are filled too.
    """
    n = p.num_samples
    reps = max(1, math.ceil(n / len(wave)))
    return np.clip(np.tile(wave, reps)[:n], -1.0, 1.0)


def log_spectrogram(wave: np.ndarray, p: AudioParams) -> np.ndarray:
    """float32 [1, F, T] = log(scipy.signal.spectrogram(wave, sr, nperseg, noverlap)[2] + eps)."""
    _, _, spec = scipy.signal.spectrogram(np.asarray(wave, dtype=np.float64), p.sample_rate,
                                          nperseg=p.nperseg, noverlap=p.noverlap)
    return np.log(spec + p.log_eps).astype(np.float32)[None]


def decode_waveform(src: Source, p: AudioParams | None = None, *, limits: Limits | None = None,
                    name: str | None = None, max_samples: int | None = None) -> np.ndarray:
    """Mono float32 waveform at p.sample_rate (default 16 kHz) via PyAV's resampler (first max_samples only)."""
    if p is None:
        from dimml.modalities.audio import AudioParams
        p = AudioParams()
    name = source_name(src, name)
    with open_media(src, name) as c:
        checked_info(c, name, as_limits(limits))
        stream = audio_stream(c)
        if stream is None:
            raise MediaError(name, "no_audio", "no audio stream")
        return decode_audio(c, stream, p.sample_rate, name, max_samples)


def demux_to_end(packets: Iterator) -> None:
    """Run a demux generator to its end without decoding (read errors there are ignored): PyAV (18.1)
    leaks ~150 bytes of native memory per demux generator left before its end, and decoders stop
    early on every upload (the first seconds of audio, the frames wanted; BENCHMARKS.md, the soak)."""
    with contextlib.suppress(av.FFmpegError):
        for _ in packets:
            pass


def frame_array(frame: av.VideoFrame, **reformat) -> np.ndarray:
    """frame.to_ndarray(**reformat) scaled with set_codec_threads' threads (PyAV's default, FFmpeg's
    choice, starts the scaler's threads anew for every frame converted)."""
    return frame.to_ndarray(threads=_codec_threads, **reformat)


class MonoResampler:
    """Audio frames -> mono float32 frames at `rate`: av.AudioResampler's filter graph (abuffer ->
    aformat -> abuffersink, FFmpeg inserting the resampler), but with set_codec_threads' thread
    count (PyAV's starts FFmpeg's default thread pool in every resampler's graph)."""

    def __init__(self, rate: int):
        self.rate, self.graph = rate, None

    def _build(self, frame: av.AudioFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        graph.threads = _codec_threads   # before any filter is added
        extra = {"time_base": str(frame.time_base)} if frame.time_base is not None else {}
        src = graph.add("abuffer", sample_rate=str(frame.sample_rate), sample_fmt=frame.format.name,
                        channel_layout=frame.layout.name, **extra)
        fmt = graph.add("aformat", sample_rates=str(self.rate), sample_fmts="flt", channel_layouts="mono")
        sink = graph.add("abuffersink")
        src.link_to(fmt)
        fmt.link_to(sink)
        graph.configure()
        return graph

    def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """The frames ready after pushing `frame` (None: the end, flushing what is left)."""
        if self.graph is None:
            if frame is None:
                return []
            self.graph = self._build(frame)
        self.graph.push(frame)
        out = []
        while True:
            try:
                out.append(self.graph.pull())
            except (EOFError, av.BlockingIOError):   # drained: nothing more until the next push
                return out


def decode_audio(c, stream, sample_rate: int, name: str, max_samples: int | None,
                 damage: list[str] | None = None, declared_s: float | None = None) -> np.ndarray:
    """Decode an open audio stream to mono float32 at sample_rate (stopping after max_samples).

    damage: gets a line for each sign of a damaged file (see audio_damage); a damaged tail is
    kept (players do the same) but reported. declared_s: the duration the file should have
    (default: the stream's, else the container's).
    """
    resampler = MonoResampler(sample_rate)
    chunks: list[np.ndarray] = []
    have = corrupt = 0
    enough, failed = False, None
    packets = c.demux(stream)
    try:
        for packet in packets:
            for frame in packet.decode():   # the last packet (empty) flushes the decoder
                corrupt += frame.is_corrupt
                frame.pts = None  # let the resampler count samples; broken pts must not drop audio
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    have += chunks[-1].size
                if max_samples is not None and have >= max_samples:
                    enough = True
                    break
            if enough:
                break
        if not enough:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
                have += chunks[-1].size
    except av.FFmpegError as e:
        if not chunks:
            raise MediaError(name, "undecodable", f"audio stream cannot be decoded ({e.strerror or e})") from None
        failed = e.strerror or str(e)
    finally:
        demux_to_end(packets)   # the rest only demuxed: an error there is no damage to the samples taken
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if wave.size == 0:
        raise MediaError(name, "empty", "audio stream holds no samples")
    if damage is not None:
        if declared_s is None:
            declared_s = _stream_duration(stream) or (c.duration / av.time_base if c.duration else None)
        damage += audio_damage(have / sample_rate, declared_s, corrupt=corrupt, ran_out=not enough, failed=failed)
    return wave[:max_samples] if max_samples is not None else wave


def audio_damage(decoded_s: float, declared_s: float | None, *, corrupt: int, ran_out: bool,
                 failed: str | None) -> list[str]:
    """What decoding an audio stream found wrong: frames flagged corrupt, a decoder error part way,
    a stream that ran out far before its declared duration."""
    out = []
    if corrupt:
        out.append(f"the decoder flagged {corrupt} audio frame(s) as damaged")
    if failed:
        out.append(f"the audio stream stops decoding after {decoded_s:.2f} s ({failed})")
    elif ran_out and declared_s and cut_short(decoded_s, declared_s):
        out.append(f"the audio stream ends at {decoded_s:.2f} s of the {declared_s:.2f} s declared "
                   "(a truncated file?)")
    return out


def cut_short(decoded_s: float, declared_s: float) -> bool:
    """A stream that ended far before its declared duration (SHORT_FRACTION, SHORT_MIN_S)."""
    return decoded_s < SHORT_FRACTION * declared_s and declared_s - decoded_s > SHORT_MIN_S


def wav_declared_s(src: Source) -> float | None:
    """Seconds of audio a RIFF/WAVE file's header says its data chunk holds; None when unknown.

    FFmpeg measures a cut WAV by its size, so only the header tells it was cut. None for a
    streamed WAV (data size 0 or 0xFFFFFFFF) or a header that does not parse.
    """
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            head = f.read(1 << 16)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        head = bytes(src[:1 << 16])
    else:   # a file object PyAV may be reading: its position is put back
        at = src.tell()
        src.seek(0)
        head = src.read(1 << 16)
        src.seek(at)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, None
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"fmt " and pos + 16 <= len(head):
            byte_rate = int.from_bytes(head[pos + 16:pos + 20], "little")
        elif chunk == b"data":
            if not byte_rate or size in (0, 0xFFFFFFFF):
                return None
            return size / byte_rate
        pos += 8 + size + (size & 1)
    return None


# ---------------------------------------------------------------------------------------
# video

@dataclass
class FrameTally:
    """What decoding a video stream saw, for the damage report: frames, corrupt ones, the last time."""

    decoded: int = 0
    corrupt: int = 0
    last_s: float | None = None
    ran_out: bool = False          # the stream ended before decoding stopped on its own
    failed: str | None = None      # the decoder's error part way (the frames before it are kept)
    # One demux per stream, kept across calls (and seeks) and run to its end by `finish`
    # (demux_to_end: frame pickers stop early on every clip).
    _packets: Iterator | None = field(default=None, repr=False, compare=False)

    def frames(self, c, stream):
        """The stream's frames, counting as they come; a later call goes on where the last one
        stopped (or where a seek since moved to). A decoder error after some frames ends the stream
        there (a damaged tail, kept and reported, as for audio); one before any frame is raised."""
        if self._packets is None:
            self._packets = c.demux(stream)
        try:
            for packet in self._packets:
                for frame in packet.decode():   # the last packet (empty) flushes the decoder
                    self.decoded += 1
                    self.corrupt += frame.is_corrupt
                    if frame.time is not None:
                        self.last_s = frame.time
                    yield frame
            self._packets = None   # ran to its end: nothing left to finish
        except av.FFmpegError as e:
            if not self.decoded:
                raise
            self.failed = e.strerror or str(e)
        self.ran_out = True

    def finish(self) -> None:
        """Demux the rest of the stream without decoding it (see _packets)."""
        packets, self._packets = self._packets, None
        if packets is not None:
            demux_to_end(packets)

    def damage(self, info: MediaInfo) -> list[str]:
        """Frames the decoder flagged; a stream that ran out far before its declared duration."""
        out = []
        if self.corrupt:
            out.append(f"the decoder flagged {self.corrupt} of {self.decoded} decoded video frame(s) as damaged")
        if self.failed:
            out.append(f"the video stream stops decoding after {self.decoded} frame(s) ({self.failed})")
            return out
        declared, v = video_duration(info), info.first("video")
        if self.ran_out and self.last_s is not None and declared:
            end = self.last_s + (1 / v.fps if v is not None and v.fps else 0.0)
            if cut_short(end, declared):
                out.append(f"the video stream ends at {end:.2f} s of the {declared:.2f} s its container "
                           "declares (a truncated file?)")
        return out


@contextlib.contextmanager
def opened_video(src: Source, name: str, limits: Limits):
    """(container, checked MediaInfo, video stream decoding on threads, FrameTally) of a video;
    no_video if it has none. Decode through the tally (`pick_frames`, `consecutive_frames`): on
    leaving the block, what it saw wrong goes to the MediaInfo's `damage`.

    FFmpeg errors raised while decoding inside the block become MediaError "undecodable".
    """
    with open_media(src, name) as c:
        info = checked_info(c, name, limits)
        stream = video_stream(c)
        if stream is None:
            raise MediaError(name, "no_video", "no video stream")
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = _codec_threads
        tally = FrameTally()
        try:
            yield c, info, stream, tally
        except av.FFmpegError as e:
            raise MediaError(name, "undecodable", f"video stream cannot be decoded ({e.strerror or e})") from None
        finally:
            tally.finish()
        info.damage += tally.damage(info)


def some_frames(frames: list, name: str) -> list:
    """The decoded frames, or MediaError "undecodable" when there are none."""
    if not frames:
        raise MediaError(name, "undecodable", "video stream holds no decodable frame")
    return frames


def frame_times(duration_s: float, n: int) -> list[float]:
    """Centres of n equal segments of the clip: the deterministic inference sampling."""
    return [duration_s * (k + 0.5) / n for k in range(n)]


def video_duration(info: MediaInfo) -> float:
    """The video stream's duration, else the container's; 0.0 when unknown."""
    v = info.first("video")
    duration = (v.duration_s if v is not None else None) or info.duration_s
    return duration if duration and duration > 0 else 0.0


def pick_frames(c, stream, targets: list[float], tally: FrameTally | None = None) -> list[av.VideoFrame]:
    """For each target time, the frame on screen at that time; decodes only what it needs.

    Decodes forward; when the next target is more than SEEK_GAP_S ahead it seeks (to the
    keyframe before the target); it stops right after the last target's frame.
    """
    if tally is None:   # a tally of its own, run to its end (see FrameTally._packets)
        tally = FrameTally()
        try:
            return pick_frames(c, stream, targets, tally)
        finally:
            tally.finish()
    picked: list[av.VideoFrame] = []
    prev = None
    tried_seek = set()
    while len(picked) < len(targets):
        restart = False
        for frame in tally.frames(c, stream):
            t = frame.time if frame.time is not None else 0.0
            while len(picked) < len(targets) and t > targets[len(picked)] + 1e-6:
                picked.append(prev if prev is not None else frame)
            if len(picked) == len(targets):
                break
            nxt = targets[len(picked)]
            if nxt - t > SEEK_GAP_S and nxt not in tried_seek:
                tried_seek.add(nxt)   # at most one seek per target: no loop on sparse keyframes
                try:
                    c.seek(int(nxt / stream.time_base), stream=stream, backward=True)
                except av.FFmpegError:
                    pass             # not seekable (e.g. a pipe-like stream): decode through
                else:
                    prev, restart = None, True
                    break
            prev = frame
        if not restart:
            break
    if prev is None and not picked:
        return []
    while len(picked) < len(targets):   # clip shorter than its metadata said: repeat the last
        picked.append(prev if prev is not None else picked[-1])
    return picked


def consecutive_frames(c, stream, start_s: float, count: int, tally: FrameTally | None = None) -> list[av.VideoFrame]:
    """`count` consecutive decoded frames, the first being the one on screen at start_s.

    A stream that ends early repeats its last frame; an empty one gives []. Seeks (to the
    keyframe before start_s) when start_s is more than SEEK_GAP_S in.
    """
    if tally is None:   # a tally of its own, run to its end (see FrameTally._packets)
        tally = FrameTally()
        try:
            return consecutive_frames(c, stream, start_s, count, tally)
        finally:
            tally.finish()
    if start_s > SEEK_GAP_S:
        try:
            c.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        except av.FFmpegError:
            pass   # not seekable: decode through
    picked: list[av.VideoFrame] = []
    prev = None
    for frame in tally.frames(c, stream):
        if picked:
            picked.append(frame)
        elif frame.time is not None and frame.time <= start_s + 1e-6:
            prev = frame      # still before (or at) the start: remember the frame on screen
            continue
        else:
            picked.extend([prev, frame] if prev is not None else [frame])
        if len(picked) >= count:
            break
    if not picked and prev is not None:
        picked.append(prev)
    while picked and len(picked) < count:
        picked.append(picked[-1])
    return picked[:count]


# ---------------------------------------------------------------------------------------
# still images

def _is_still_format(fmt: str) -> bool:
    """FFmpeg's single-image demuxers (png_pipe, jpeg_pipe, webp_pipe, ...); gif/webp give their first frame."""
    return fmt.endswith("_pipe") and fmt not in ("image2pipe", "yuv4mpegpipe") or fmt in ("gif", "webp")


def decode_still(src: Source, name: str, limits: Limits) -> tuple[av.VideoFrame, MediaInfo]:
    """A still image file (PNG, JPEG, WebP, BMP, ...) -> its (first) frame and metadata.

    The content decides, never the file name (it is read as bytes: FFmpeg would otherwise
    trust a ".png" extension), so a video or a text file is "not_media". The frame size is
    checked against limits.max_pixels from the header, before decoding. EXIF orientation is
    not applied (as PIL's Image.open, which the reference code reads images with).
    """
    data = read_bytes(src, name)
    with open_media(data, name) as c:
        if not _is_still_format(c.format.name) or video_stream(c) is None:
            raise MediaError(name, "not_media", f"not a still image (format {c.format.name})")
        info = container_info(c, name)
        info.duration_s = None   # a still image has no duration (its demuxer may report one frame's)
        check_limits(info, limits)
        tally = FrameTally()
        try:
            frame = next(tally.frames(c, video_stream(c)), None)
        except av.FFmpegError as e:
            raise MediaError(name, "undecodable", f"image cannot be decoded ({e.strerror or e})") from None
        finally:
            tally.finish()
    if frame is None:
        raise MediaError(name, "undecodable", "image holds no decodable picture")
    return frame, info


# ---------------------------------------------------------------------------------------
# the contract

def decode_sample(files: Mapping[str, Source | None], cfg: PreprocessConfig, *,
                  names: Mapping[str, str] | None = None, allow_missing: bool = False,
                  only: Iterable[str] | None = None) -> Clip:
    """Decode one sample's source files into one array per modality of cfg (or of `only`).

    files: sources keyed by field: "video" for the video-derived kinds, a modality's name for a
    file of its own (for a video-derived kind it replaces the video for that modality). Fields
    no wanted modality reads are ignored. names: display names per field (uploads).
    A modality without a source, or whose source lacks it (the kind's `missing_cause`, e.g.
    "no_audio"), raises MediaError unless allow_missing; then it is absent from the Clip (at
    least one must be present). Every other MediaError is raised. Deterministic: same files,
    same arrays.
    """
    names = names or {}
    wanted = _wanted(cfg, only)
    arrays: dict[str, np.ndarray] = {}
    infos: dict[str, MediaInfo] = {}
    missing: dict[str, MediaError] = {}
    for spec in cfg.modalities:
        if spec.name not in wanted:
            continue
        kind = spec.kind_obj
        fld = spec.name if files.get(spec.name) is not None else spec.field
        src = files.get(fld)
        label = source_name(src, names.get(fld)) if src is not None else fld
        try:
            if src is None:
                raise MediaError(label, "missing",
                                 f"no source for modality {spec.name!r} (give the field {fld!r})")
            array, info = kind.decode(src, spec.params, cfg.limits, label)
        except MediaError as e:
            if not allow_missing or (src is not None and e.cause != kind.missing_cause):
                raise
            missing[spec.name] = e
            continue
        arrays[spec.name] = array
        if fld in infos:   # a source several modalities read: each decode's damage, once
            infos[fld].damage += [d for d in info.damage if d not in infos[fld].damage]
        else:
            infos[fld] = info
    if not arrays:
        first = next(iter(missing.values()))
        raise MediaError(first.name, first.cause, "none of the modalities "
                         f"{', '.join(n for n in cfg.names if n in wanted)} is present: "
                         + "; ".join(str(e) for e in missing.values()))
    return Clip(arrays, infos, missing)


def _wanted(cfg: PreprocessConfig, only: Iterable[str] | None) -> set[str]:
    if only is None:
        return set(cfg.names)
    wanted = set(only)
    unknown = wanted - set(cfg.names)
    if not wanted or unknown:
        raise ValueError(f"`only` must name some of the modalities {', '.join(cfg.names)}; "
                         f"got {sorted(wanted)}")
    return wanted


def decode_clip(video: Source, cfg: PreprocessConfig | None = None, *, allow_missing: bool = False,
                name: str | None = None) -> Clip:
    """Decode a lone video (path, bytes or binary file): decode_sample({"video": video}, cfg)."""
    return decode_sample({VIDEO_FIELD: video}, cfg or PreprocessConfig(),
                         names={VIDEO_FIELD: name} if name else None, allow_missing=allow_missing)


__all__ = ["MediaError", "MediaInfo", "StreamInfo", "Clip", "Source", "decode_sample", "decode_clip",
           "decode_waveform", "probe", "fit_waveform", "log_spectrogram", "frame_times", "source_name",
           "open_media", "read_bytes", "container_info", "check_limits", "checked_info", "as_limits",
           "video_stream", "audio_stream", "decode_audio", "video_duration", "pick_frames",
           "consecutive_frames", "decode_still", "FrameTally", "audio_damage", "cut_short", "wav_declared_s",
           "set_codec_threads", "frame_array", "MonoResampler", "demux_to_end",
           "SEEK_GAP_S"]
