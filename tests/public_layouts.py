"""Small copies of four public datasets' on-disk layouts, written from their distributions' own facts.

Each builder writes what a user who downloaded the dataset has on disk (folder and file names,
list files with their headers and line endings, containers and codecs), with few and short
clips, and returns what the lists imply (the expected per-split class counts), computed here from
the rows it wrote, never through dimml's readers. Sources (research notes of issue 18):

* CREMA-D (github.com/CheyneyComputerScience/CREMA-D): `VideoFlash/<Actor>_<Sentence>_<Emotion>_<Level>.flv`
  (FLV1 video + MP3 audio) and `AudioWAV/<same>.wav` (16 kHz mono 16-bit); the DI-MML authors' split
  `train.csv` / `test.csv` (data/CREMAD/ of fanyunfeng-bit/DI-MML and GeWu-Lab/OGM-GE): headerless
  `<clip>,<EMOTION>` rows, CRLF.
* AVE (AVE_Dataset.zip, github.com/YapengTian/AVE-ECCV18): `AVE/<VideoID>.mp4`, `Annotations.txt`
  with the header `Category&VideoID&Quality&StartTime&EndTime`, and `trainSet.txt` / `valSet.txt` /
  `testSet.txt` in the same `&` format without a header, LF. 45 of the real 4097 videos are listed
  more than once under different categories (multi-event videos), 8 of them in trainSet and testSet.
* UCF101: `UCF-101/<Class>/v_<Class>_gGG_cCC.avi` (xvid, 320x240, 25 fps) and
  `ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt`, CRLF: `1 ApplyEyeMakeup`,
  `ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1`, test lists without the label. The class
  HandstandPushups holds `v_HandStandPushups_*` files (so spelt in the official lists too); the
  DI-MML authors' edited lists and Feichtenhofer's TV-L1 tree spell them `v_HandstandPushups_*`.
  TV-L1 tree (feichtenhofer/twostreamfusion, gpu_flow): `tvl1_flow/{u,v}/<video stem>/frame%06d.jpg`,
  one fewer than the video's frames, measured on grey frames resized (bicubic) to 340x256, clipped to
  +-20 px and quantised round(255 (d + 20) / 40), single-channel JPEG, no class folder.
* ModelNet40 MVCNN renders (modelnet40_images_new_12x, jongchyisu/mvcnn_pytorch):
  `<class>/<train|test>/<class>_NNNN.obj.shaded_vVVV.png`, views 001..012, object numbers shared by a
  class's train and test. Image size and colour mode are not documented: 224x224 RGB here.

Durations are cut short (real AVE clips are 10 s) to keep the tests quick.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training.clipwriter import write_clip

from conftest import write_image

CRLF, LF = "\r\n", "\n"


def _lines(path: Path, rows: list[str], newline: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(r + newline for r in rows).encode("utf-8"))
    return path


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random grey texture (uint8 [h, w]): something optical flow can follow."""
    import cv2
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur((rng.random((h, w)) * 255).astype(np.uint8), (0, 0), 3)


def _av_clip(path: Path, cls: int, n_classes: int, *, size: tuple[int, int], fps: float, seconds: float,
             seed: int, audio_rate: int, **codecs) -> Path:
    """A clip whose class is its colour and its tone (both modalities informative)."""
    w, h = size
    n = max(2, int(seconds * fps))
    rng = np.random.default_rng(seed)
    hue = np.array([255 * (cls + 1) // (n_classes + 1), 255 - 255 * cls // n_classes, 128], np.uint8)
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = hue
        y, x = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
        frames[i, y:y + h // 4, x:x + w // 4] = 255 - hue
    t = np.arange(int(seconds * audio_rate)) / audio_rate
    tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * cls) * t) + 0.02 * rng.normal(size=t.size)
    return write_clip(path, frames, fps=fps, audio=tone.astype(np.float32), sample_rate=audio_rate, **codecs)


# ---------------------------------------------------------------------------------------
# CREMA-D

CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "DFA", "ITH")
CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def make_cremad(root: Path, actors=(1001, 1002, 1003), emotions=CREMAD_EMOTIONS, test_actor: int = 1003) -> dict:
    """CREMA-D with the authors' train.csv / test.csv (CRLF, headerless) beside it.

    Returns {"classes": the six emotions, "counts": {split: {emotion: n}}, "train_csv", "test_csv"}.
    """
    rows = {"train": [], "test": []}
    for a in actors:
        for s_i, sentence in enumerate(CREMAD_SENTENCES[:1]):
            for emotion in emotions:
                level = "XX" if s_i else "HI"
                clip = f"{a}_{sentence}_{emotion}_{level}"
                cls = CREMAD_EMOTIONS.index(emotion)
                seed = a * 100 + s_i * 10 + cls
                _av_clip(root / "VideoFlash" / f"{clip}.flv", cls, 6, size=(480, 360), fps=30, seconds=1.6,
                         seed=seed, audio_rate=44100, video_codec="flv", audio_codec="libmp3lame")
                t = np.arange(int(1.6 * 16000)) / 16000
                speech = 0.3 * np.sin(2 * np.pi * (200 + 150 * cls) * t)
                write_clip(root / "AudioWAV" / f"{clip}.wav", None, audio=speech.astype(np.float32),
                           sample_rate=16000, audio_codec="pcm_s16le")
                rows["test" if a == test_actor else "train"].append((clip, emotion))
    out = {"classes": list(CREMAD_EMOTIONS), "counts": {}}
    for split, items in rows.items():
        out[f"{split}_csv"] = _lines(root / f"{split}.csv", [f"{c},{e}" for c, e in items], CRLF)
        out["counts"][split] = {e: sum(1 for _, x in items if x == e) for e in CREMAD_EMOTIONS}
    return out


# ---------------------------------------------------------------------------------------
# AVE

AVE_CATEGORIES = ("Church bell", "Male speech, man speaking", "Frying (food)", "Violin, fiddle")
# (category, VideoID, start, end, split): IDs as YouTube spells them (leading '-', '_'); one video
# with two events in train, one in train and test under two categories (as -9_5_2i4igQ is)
AVE_ROWS = [
    ("Church bell", "RUhOCu3LNXM", 0, 10, "train"), ("Church bell", "MH3m4AwEcRY", 6, 8, "train"),
    ("Church bell", "c---zaDCTaE", 0, 10, "val"), ("Church bell", "EsfJpLbBeb4", 0, 10, "test"),
    ("Male speech, man speaking", "0giAfYq9oVM", 3, 9, "train"),
    ("Male speech, man speaking", "1f9QJVrgs7Y", 2, 10, "train"),
    ("Male speech, man speaking", "PIdEa_F_VYg", 0, 10, "val"), ("Male speech, man speaking", "hOuyJFqb4JM", 0, 5, "test"),
    ("Frying (food)", "AIs4gx9RVTs", 6, 10, "train"), ("Frying (food)", "ByNj4TXWBEQ", 0, 4, "train"),
    ("Frying (food)", "dODwkYHQF9E", 0, 10, "val"), ("Frying (food)", "XGVkq0Kl2aw", 0, 10, "test"),
    ("Violin, fiddle", "-1qyr-IzqKY", 0, 10, "train"), ("Frying (food)", "-1qyr-IzqKY", 0, 10, "train"),
    ("Violin, fiddle", "-9_5_2i4igQ", 0, 10, "train"), ("Church bell", "-9_5_2i4igQ", 0, 10, "test"),
    ("Violin, fiddle", "DTWkL01Z8So", 0, 10, "val"), ("Violin, fiddle", "6SSbFLc-dfE", 0, 10, "test"),
]
AVE_SPLIT_FILE = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}


def make_ave(root: Path, seconds: float = 2.0) -> dict:
    """AVE_Dataset as unzipped: AVE/*.mp4, Annotations.txt (header), the three split files (no header).

    Returns {"classes", "counts": {split: {category: n rows}}, "multi_label": {video: categories},
    "cross_split": videos in two splits}.
    """
    videos: dict[str, list[str]] = {}
    for cat, vid, *_ in AVE_ROWS:
        videos.setdefault(vid, []).append(cat)
    for i, (vid, cats) in enumerate(sorted(videos.items())):
        _av_clip(root / "AVE" / f"{vid}.mp4", AVE_CATEGORIES.index(cats[0]), len(AVE_CATEGORIES),
                 size=(320, 240), fps=25, seconds=seconds, seed=i, audio_rate=44100)
    row = lambda r: f"{r[0]}&{r[1]}&good&{r[2]}&{r[3]}"
    _lines(root / "Annotations.txt", ["Category&VideoID&Quality&StartTime&EndTime"] + [row(r) for r in AVE_ROWS], LF)
    for split, name in AVE_SPLIT_FILE.items():
        _lines(root / name, [row(r) for r in AVE_ROWS if r[4] == split], LF)
    counts = {split: {c: sum(1 for r in AVE_ROWS if r[4] == split and r[0] == c) for c in AVE_CATEGORIES}
              for split in AVE_SPLIT_FILE}
    splits_of = {v: {r[4] for r in AVE_ROWS if r[1] == v} for v in videos}
    return {"classes": sorted(AVE_CATEGORIES), "counts": counts,
            "multi_label": {v: sorted(c) for v, c in videos.items() if len(c) > 1},
            "cross_split": sorted(v for v, s in splits_of.items() if len(s) > 1)}


# ---------------------------------------------------------------------------------------
# UCF101

UCF_CLASSES = ("ApplyEyeMakeup", "HandstandPushups", "YoYo")     # a subset, numbered as classInd.txt numbers them
UCF_INDEX = {"ApplyEyeMakeup": 1, "HandstandPushups": 37, "YoYo": 101}
UCF_MOTION = {"ApplyEyeMakeup": (2, 0), "HandstandPushups": (0, 2), "YoYo": (-2, -1)}   # px per frame, the class's cue


def ucf_file_stem(cls: str) -> str:
    """The class as its video files spell it: HandstandPushups' files are v_HandStandPushups_*."""
    return "HandStandPushups" if cls == "HandstandPushups" else cls


def moving_video(path: Path, motion: tuple[int, int], *, frames: int, seed: int, size=(320, 240),
                 fps: int = 25, **codecs) -> Path:
    """A texture translating by `motion` px per frame (RGB, the colour from the seed)."""
    w, h = size
    dx, dy = motion
    pad = max(abs(dx), abs(dy)) * frames + 8
    tex = _texture(h + 2 * pad, w + 2 * pad, seed)
    tint = np.random.default_rng(seed).uniform(0.5, 1.0, 3)
    out = np.empty((frames, h, w, 3), np.uint8)
    for i in range(frames):
        y0, x0 = pad - dy * i, pad - dx * i       # content moves by (+dx, +dy) per frame
        grey = tex[y0:y0 + h, x0:x0 + w].astype(np.float32)
        out[i] = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
    return write_clip(path, out, fps=fps, **codecs)


def tvl1_tree_folder(root: Path, video: Path, stem: str) -> Path:
    """The TV-L1 tree of one video by gpu_flow's convention: grey frames resized (bicubic) to short
    side 256 with even sizes (320x240 -> 340x256), flow of each pair (DIS stands in for TV-L1, whose
    CPU version takes ~1.5 s a pair), clipped to +-20 px, round(255 (d + 20) / 40), one JPEG per pair."""
    import av
    import cv2
    with av.open(str(video)) as c:
        grey = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
    h, w = grey[0].shape
    factor = max(256 / w, 256 / h)
    size = (int(w * factor) // 2 * 2, int(h * factor) // 2 * 2)
    grey = [cv2.resize(g, size, interpolation=cv2.INTER_CUBIC) for g in grey]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    for k in range(len(grey) - 1):
        flow = dis.calc(grey[k], grey[k + 1], None)
        q = np.rint((np.clip(flow, -20, 20) + 20) * 255 / 40).astype(np.uint8)
        for comp, plane in (("u", q[..., 0]), ("v", q[..., 1])):
            out = root / "tvl1_flow" / comp / stem / f"frame{k + 1:06d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".jpg", plane)
            assert ok
            out.write_bytes(buf.tobytes())
    return root / "tvl1_flow" / "u" / stem


def make_ucf101(root: Path, *, groups: int = 4, frames: int = 16, tree: bool = True,
                edited_lists: bool = False) -> dict:
    """UCF101 as unpacked (UCF-101/ + ucfTrainTestlist/, CRLF lists) with a TV-L1 tree for every video.

    Split N tests on group N (as the real lists hold out 7 groups of 25). edited_lists: the DI-MML
    authors' spelling `HandstandPushups/v_HandstandPushups_...` in the lists (the files keep HandStand).
    Returns {"classes" (classInd order), "counts": {split_id: {split: {class: n}}}, "videos": [paths]}.
    """
    videos = []
    for ci, cls in enumerate(UCF_CLASSES):
        for g in range(1, groups + 1):
            name = f"v_{ucf_file_stem(cls)}_g{g:02d}_c01"
            path = moving_video(root / "UCF-101" / cls / f"{name}.avi", UCF_MOTION[cls], frames=frames,
                                seed=ci * 10 + g, video_codec="mpeg4", codec_tag="XVID")
            videos.append((cls, g, path))
            if tree:   # Feichtenhofer's tree: lower-case s in HandstandPushups
                tvl1_tree_folder(root, path, f"v_{cls}_g{g:02d}_c01")
    lists = root / "ucfTrainTestlist"
    _lines(lists / "classInd.txt", [f"{UCF_INDEX[c]} {c}" for c in UCF_CLASSES], CRLF)
    listed = lambda cls, p: f"{cls}/{p.name.replace('HandStand', 'Handstand') if edited_lists else p.name}"
    counts = {}
    for n in (1, 2, 3):
        _lines(lists / f"trainlist0{n}.txt", [f"{listed(c, p)} {UCF_INDEX[c]}" for c, g, p in videos if g != n], CRLF)
        _lines(lists / f"testlist0{n}.txt", [listed(c, p) for c, g, p in videos if g == n], CRLF)
        counts[n] = {"train": {c: groups - 1 for c in UCF_CLASSES}, "test": {c: 1 for c in UCF_CLASSES}}
    return {"classes": list(UCF_CLASSES), "counts": counts, "videos": [p for _, _, p in videos]}


# ---------------------------------------------------------------------------------------
# ModelNet40 (MVCNN 12-view renders)

MODELNET_CLASSES = ("airplane", "bathtub", "night_stand")


def make_modelnet40(root: Path, *, train: int = 4, test: int = 2, size: int = 224) -> dict:
    """modelnet40_images_new_12x: every object's 12 shaded views (a grey shape on black, per class)."""
    import cv2
    counts = {"train": {}, "test": {}}
    for ci, cls in enumerate(MODELNET_CLASSES):
        number = 0
        for split, n in (("train", train), ("test", test)):
            counts[split][cls] = n
            for _ in range(n):
                number += 1
                for view in range(1, 13):
                    img = np.zeros((size, size, 3), np.uint8)
                    c = size // 2
                    r = size // 4 + 3 * view
                    shade = 120 + 40 * ci
                    if ci == 0:
                        cv2.circle(img, (c, c), r, (shade,) * 3, -1)
                    elif ci == 1:
                        cv2.rectangle(img, (c - r, c - r // 2), (c + r, c + r // 2), (shade,) * 3, -1)
                    else:
                        pts = np.array([[c, c - r], [c - r, c + r], [c + r, c + r]], np.int32)
                        cv2.fillPoly(img, [pts], (shade,) * 3)
                    write_image(root / cls / split / f"{cls}_{number:04d}.obj.shaded_v{view:03d}.png", img)
    return {"classes": list(MODELNET_CLASSES), "counts": counts}
