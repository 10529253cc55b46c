"""Media for the encoders: images and video clips decoded (PIL, PyAV) and sized to a pixel budget, with errors that
name the file and the record. Used by model.py's prepare_queries / prepare_targets."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: set before transformers loads, as in model.py

import logging
import math

import av
import numpy as np
import torch
from PIL import Image
from transformers import video_utils
from transformers.image_transforms import convert_to_rgb

from plumbing import DataError


def load_image(path, record_id=None):
    """An RGB image; transparent parts are seen over white, as transformers' Qwen3-VL image processing does
    (convert_to_rgb): a plain convert("RGB") keeps whatever colour lies under them, black in most cut-out product
    shots and sketches. 16-bit grey (a 16-bit PNG or TIFF) is scaled to 8 bits: convert_to_rgb clips it at 255, which
    turns all but the darkest images white; 32-bit integer or float pixels, of no known range, are refused."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16"):
                image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
            elif image.mode in ("I", "F"):
                raise DataError(path, f"cannot read image: 32-bit pixels (mode {image.mode}) have no known range; "
                                      f"save it with 8 or 16 bits per channel", record_id)
            return Image.fromarray(convert_to_rgb(image, return_numpy=True))
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # missing, truncated, not an image
        raise DataError(path, f"cannot read image: {err}", record_id) from err


def fill_size(height, width, pixels, factor=32):
    """(height, width) that use a budget of `pixels` fully: sides multiples of `factor` (patch 16 x merge 2), area
    <= pixels. Each side is the floor or the ceil (in units of factor) of the exact aspect-keeping fit; of those,
    the one whose worse axis keeps the most resolution, then the largest area. Qwen2-VL's smart_resize floors
    both sides and leaves up to ~27% of the budget unused (300x300 at 224x224 -> 192x192, 36 tokens, not 49)."""
    units = pixels // (factor * factor)
    if units < 1:
        raise ValueError(f"pixel budget {pixels} is smaller than one {factor}x{factor} patch")
    exact_h = min(max(math.sqrt(units * height / width), 1.0), units)  # exact_h * exact_w == units
    exact_w = units / exact_h
    sides = [(h, w) for h in (math.floor(exact_h), math.ceil(exact_h))
             for w in (math.floor(exact_w), math.ceil(exact_w)) if h * w <= units]
    h, w = max(sides, key=lambda s: (min(s[0] / exact_h, s[1] / exact_w), s[0] * s[1]))
    return h * factor, w * factor


def resize_to_budget(image, min_pixels, max_pixels):
    """The image (PIL) resized by fill_size to its own area clamped to [min_pixels, max_pixels]."""
    area = min(max(image.width * image.height, min_pixels), max_pixels)
    height, width = fill_size(image.height, image.width, area)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def resize_frames(frames, height, width):
    """Video frames (uint8 [T, H, W, 3]) resized as Qwen3-VL's video processor resizes them (torchvision, bicubic,
    antialiased), so a clip sized here gets the pixels the processor would give it."""
    from torchvision.transforms.v2 import functional as tvF
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    x = tvF.resize(x, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return x.permute(0, 2, 3, 1).numpy()


# Qwen3-VL's video processor (transformers 5.24) warns on every run that leaves `cap_pixels_per_frame` unset: the
# parameter's default is to change, then the parameter to go. We size every frame ourselves and never let the
# processor resize (do_resize=False), so the cap has nothing to act on; passing it would be the deprecated API.
# That one warning is filtered out; the filter matches nothing once the parameter is gone.
logging.getLogger("transformers.models.qwen3_vl.video_processing_qwen3_vl").addFilter(
    lambda record: "cap_pixels_per_frame" not in record.getMessage())


def load_video(path, num_frames=8, record_id=None):
    """(frames uint8 [num_frames, H, W, 3], VideoMetadata), sampled uniformly with PyAV. Clips with fewer frames
    repeat frames, so exactly num_frames always come back (the processor's default re-sampling drops some silently)."""
    def uniform(metadata, **kwargs):  # like load_video's own sampling, which refuses clips shorter than num_frames
        if metadata.total_num_frames == 0:  # .mkv, .webm, .ts store no frame count: count by decoding
            with av.open(path) as container:
                metadata.total_num_frames = sum(1 for _ in container.decode(video=0))
        return np.linspace(0, max(metadata.total_num_frames - 1, 0), num_frames).round().astype(int)

    if not os.path.isfile(path):  # checked here: load_video would fetch http(s) paths and call others a format error
        raise DataError(path, "video file not found", record_id)
    try:
        frames, meta = video_utils.load_video(path, backend="pyav", sample_indices_fn=uniform)
    except Exception as err:  # PyAV raises its own error family (and IndexError, ValueError, ...) on bad files
        raise DataError(path, f"cannot read video: {video_problem(path) or err}", record_id) from err
    # PyAV yields each index once and none past the decoded end; map the frames we got back to their indices.
    decoded = np.unique(meta.frames_indices)
    pick = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    meta.frames_indices = decoded[pick].tolist()
    meta.fps = meta.fps or 24.0  # the timestamps in Qwen3-VL's video prompt divide by it; 24 is the processor's default
    return frames[pick], meta


def video_problem(path):
    """What makes a video file unreadable, in words, where transformers' reader says it obscurely, or None. The reader
    takes streams.video[0] and stacks what it decodes: an audio-only file fails with "tuple index out of range", a
    stream with no decodable frame with "need at least one array to stack", and a file cut within its header with
    PyAV's "[Errno 541478725] End of file". Called only once reading has failed, so readable clips are opened once."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = ", ".join(stream.type for stream in container.streams) or "none"
                return f"the file has no video stream (streams: {kinds})"
            if next(container.decode(video=0), None) is None:
                return "its video stream has no decodable frames"
    except av.error.EOFError:
        return "the file ends before its first frame (cut short?)"
    except Exception:         # another fault: the reader's own message is the one to give
        return None
    return None
