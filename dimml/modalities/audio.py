"""Kind `audio`: a log spectrogram of the audio track (of the video, or of an audio file of its own)."""
from __future__ import annotations

from dataclasses import dataclass

from dimml.modalities import Kind, register_kind


@dataclass(frozen=True)
class AudioParams:
    """Mono, resampled, tiled/cropped to `seconds` (as the reference code does), then
    log(scipy.signal.spectrogram(x, sample_rate, nperseg, noverlap) + log_eps)."""

    sample_rate: int = 16000
    seconds: float = 3.0
    nperseg: int = 512            # -> 257 frequency bins
    noverlap: int = 353           # hop 159 samples: 299 columns for 3 s at 16 kHz
    log_eps: float = 1e-7

    @property
    def num_samples(self) -> int:
        """Waveform length fed to the spectrogram."""
        return int(round(self.sample_rate * self.seconds))

    @property
    def freq_bins(self) -> int:
        return self.nperseg // 2 + 1

    @property
    def time_bins(self) -> int:
        """T of the spectrogram, as scipy.signal.spectrogram computes it."""
        return (self.num_samples - self.noverlap) // (self.nperseg - self.noverlap)


@register_kind
class Audio(Kind):
    name = "audio"
    params_cls = AudioParams
    from_video = True
    dtype = "float32"
    cache_dtype = "float16"
    encoder = "spectrogram"
    onnx_input = "spectrogram"
    missing_cause = "no_audio"

    def shape(self, p: AudioParams) -> tuple[int, ...]:
        return (1, p.freq_bins, p.time_bins)

    def decode(self, src, p: AudioParams, limits, name: str):
        """The first audio track: mono at p.sample_rate, tiled/cropped to p.seconds, log spectrogram."""
        from dimml import media
        with media.open_media(src, name) as c:
            info = media.checked_info(c, name, limits)
            stream = media.audio_stream(c)
            if stream is None:
                raise media.MediaError(name, "no_audio", "no audio stream")
            declared = media.wav_declared_s(src) if c.format.name == "wav" else None
            wave = media.decode_audio(c, stream, p.sample_rate, name, p.num_samples, info.damage, declared)
        return media.log_spectrogram(media.fit_waveform(wave, p), p), info
