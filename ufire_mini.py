"""U-FIRE-mini: a synthetic U-FIRE in the release's layout, small enough to train on CPU (python prepare_data.py).

U-FIRE-mini draws a catalogue of garments from a few attributes with PIL and shows each item as shop shots,
try-on photos, street photos, sketches and videos, so one item serves several tasks with different intents
(in-shop wants the item, asfr one attribute of it, CIR a modified item): the situation the calibrator is for.
Same seed and scale -> byte-identical files.
"""
import dataclasses
import functools
import itertools
import os
import random
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from prepare_data import SPLITS, SUB_DATASETS, UNSEEN_TASKS, candidate_path, triplet_path, write_json


# ----------------------------------------------------------------------------------------------------------------
# U-FIRE-mini, part 1: a catalogue of garments and how each is drawn. Shapes are polygons in a 100x100 "body
# frame" in which a standing figure's shoulders are at y=21 and its waist at y=50, so a garment drawn in that
# frame fits the figure (try-on, street, video) and is re-fitted to the canvas for shop shots and sketches.

COLOURS = {"red": (210, 40, 40), "orange": (240, 130, 30), "yellow": (235, 205, 40), "green": (40, 150, 70),
           "blue": (40, 80, 200), "purple": (125, 55, 165), "pink": (240, 140, 185), "brown": (120, 75, 40),
           "black": (30, 30, 30), "white": (248, 248, 248)}
PATTERNS = ("plain", "striped", "dotted", "checked")
CATEGORIES = {   # attributes besides colour and pattern; every combination is one catalogue item
    "t-shirt": {"sleeve": ("sleeveless", "short", "long"), "neckline": ("round", "v-neck", "square")},
    "shirt": {"sleeve": ("sleeveless", "short", "long"), "neckline": ("pointed collar", "round collar", "band collar")},
    "dress": {"sleeve": ("sleeveless", "short", "long"), "length": ("mini", "knee", "maxi"),
              "neckline": ("round", "v-neck", "square")},
    "coat": {"length": ("short", "knee", "long"), "neckline": ("collarless", "lapel", "hood")},
    "trousers": {"length": ("shorts", "cropped", "full")},
    "skirt": {"length": ("mini", "knee", "maxi"), "style": ("straight", "flared")},
    "shoes": {"style": ("sneaker", "boot", "heel", "sandal"), "trim": ("white", "black", "brown")},   # trim: sole
}
CLOTHES = ("t-shirt", "shirt", "dress", "coat", "trousers", "skirt")
TOPS, BOTTOMS = ("t-shirt", "shirt"), ("trousers", "skirt")
LAYERS = ("trousers", "skirt", "t-shirt", "shirt", "dress", "coat")   # what is worn over what
ATTRIBUTES = ("colour", "pattern", "sleeve", "length", "neckline", "style", "trim")
INK, HAIR, SKINS = (25, 25, 25), (60, 40, 25), ((241, 200, 170), (205, 150, 110), (150, 100, 70), (95, 60, 40))


def choices(category, attr):
    return tuple(COLOURS) if attr == "colour" else PATTERNS if attr == "pattern" else CATEGORIES[category][attr]


@dataclass(frozen=True)
class Item:
    uid: str
    category: str
    colour: str
    pattern: str
    sleeve: str = None
    length: str = None
    neckline: str = None
    style: str = None
    trim: str = None

    def attrs(self):
        """(name, value) of the attributes this item has, colour and pattern first."""
        return [(a, getattr(self, a)) for a in ATTRIBUTES if getattr(self, a) is not None]

    def key(self):
        return (self.category,) + tuple(getattr(self, a) for a in ATTRIBUTES)


def mirror(poly):
    return [(100 - x, y) for x, y in poly]


def ellipse(cx, cy, rx, ry, n=14):
    return [(cx + rx * np.cos(2 * np.pi * k / n), cy + ry * np.sin(2 * np.pi * k / n)) for k in range(n)]


ARMS = {"short": [(32, 21), (23, 37), (30, 40), (34, 30)], "long": [(32, 21), (19, 60), (27, 62), (34, 32)]}
NECK_CUTS = {"round": ellipse(50, 19, 6, 5), "collarless": ellipse(50, 19, 6, 5),
             "lapel": [(45, 17), (55, 17), (50, 38)], "v-neck": [(44, 17), (56, 17), (50, 33)],
             "square": [(44, 17), (56, 17), (56, 27), (44, 27)]}
COLLARS = {"pointed collar": [(44, 18), (50, 24), (41, 28)], "round collar": ellipse(45, 22, 5, 4, 8),
           "band collar": [(44, 16), (50, 17), (50, 21), (44, 20)]}
SHOES = {"sneaker": [[(15, 70), (40, 62), (62, 60), (80, 66), (86, 74), (86, 80), (14, 80)]],
         "boot": [[(22, 30), (45, 30), (46, 62), (78, 68), (86, 76), (86, 80), (20, 80)]],
         "heel": [[(16, 62), (34, 60), (62, 70), (86, 74), (86, 79), (60, 79), (34, 68), (24, 70)]],
         "sandal": [[(20, 66), (32, 66), (34, 78), (18, 78)], [(42, 62), (56, 62), (58, 78), (40, 78)],
                    [(66, 64), (78, 66), (82, 78), (64, 78)]]}


def shape(item, back=False):
    """Polygons of a garment: body (filled with colour and pattern), cut (holes), trim (second colour), line."""
    c, neck, body, cut, trim, line = item.category, item.neckline, [], [], [], []
    if c in ("t-shirt", "shirt", "coat", "dress"):
        bottom = {"coat": {"short": 58, "knee": 76, "long": 93}.get(item.length), "dress": 42}.get(c, 56)
        w, h = 32 if item.sleeve != "sleeveless" else 36, 4 if c == "dress" else 1   # shoulder, hem inset
        body.append([(w, 21), (44, 18), (56, 18), (100 - w, 21), (66 - h, bottom), (34 + h, bottom)])
        arm = ARMS.get("long" if c == "coat" else item.sleeve)
        body += [arm, mirror(arm)] if arm else []
        if c == "dress":
            hem = {"mini": 62, "knee": 78, "maxi": 95}[item.length]
            half = 14 + (hem - 42) * 0.35
            body.append([(37, 42), (63, 42), (50 + half, hem), (50 - half, hem)])
        if neck == "hood":
            body.append([(37, 22), (39, 11), (50, 7), (61, 11), (63, 22)])
            cut.append(ellipse(50, 15, 6, 5))
        if not back:   # necklines, collars and buttons face the front
            cut += [NECK_CUTS[neck]] if neck in NECK_CUTS else []
            trim += [COLLARS[neck], mirror(COLLARS[neck])] if neck in COLLARS else []
            if c in ("shirt", "coat"):
                line += [[(50, y), (50, y + 1.5)] for y in range(40 if neck == "lapel" else 26, bottom - 3, 7)]
            if neck == "lapel":
                line += [[(45, 17), (41, 30), (50, 38)], [(55, 17), (59, 30), (50, 38)]]
    elif c == "trousers":
        hem = {"shorts": 66, "cropped": 84, "full": 96}[item.length]
        leg = [(36, 55), (49.5, 55), (48, hem), (37, hem)]
        body += [[(36, 50), (64, 50), (64, 56), (36, 56)], leg, mirror(leg)]
    elif c == "skirt":
        hem = {"mini": 66, "knee": 80, "maxi": 96}[item.length]
        flare = (hem - 50) * (0.45 if item.style == "flared" else 0.08)
        body.append([(37, 50), (63, 50), (63 + flare, hem), (37 - flare, hem)])
    else:   # shoes; the trim is the sole, or the heel
        body += SHOES[item.style]
        trim.append([(18, 70), (26, 70), (24, 92), (20, 92)] if item.style == "heel" else
                    [(12, 79), (88, 79), (88, 86), (12, 86)])
        line += [[(44, 64), (52, 70)], [(50, 62), (58, 68)]] if item.style == "sneaker" else []
    return body, cut, trim, line


def fit_transform(polys, size, fill=0.8):
    xs, ys = [x for p in polys for x, _ in p], [y for p in polys for _, y in p]
    s = fill * size / max(max(xs) - min(xs), max(ys) - min(ys))
    return s, size / 2 - s * (min(xs) + max(xs)) / 2, size / 2 - s * (min(ys) + max(ys)) / 2


@functools.lru_cache(maxsize=64)
def pattern_tile(colour, pattern, size):
    base = COLOURS[colour]
    ink = (45, 45, 45) if sum(base) > 420 else (235, 235, 235)   # the pattern contrasts with the colour
    img = Image.new("RGB", (size, size), base)
    d, u = ImageDraw.Draw(img), size / 100
    for k, v in enumerate(np.arange(0, size, {"striped": 8, "dotted": 9, "checked": 11}.get(pattern, 100) * u)):
        if pattern == "striped":
            d.rectangle([0, v, size, v + 3.2 * u], fill=ink)
        elif pattern == "checked":
            d.rectangle([v, 0, v + 2.4 * u, size], fill=ink)
            d.rectangle([0, v, size, v + 2.4 * u], fill=ink)
        elif pattern == "dotted":
            for x in np.arange((k % 2) * 4.5 * u + 2 * u, size, 9 * u):
                d.ellipse([x - 2.2 * u, v + u, x + 2.2 * u, v + 5.4 * u], fill=ink)
    return img


@functools.lru_cache(maxsize=4096)
def garment_layer(item, size, fit, back=False):
    """RGBA drawing of one garment, in the body frame or (fit=True) centred to fill the canvas."""
    body, cut, trim, line = shape(item, back)
    s, ox, oy = fit_transform(body + trim, size) if fit else (size / 100, 0, 0)
    place = lambda poly: [(ox + s * x, oy + s * y) for x, y in poly]
    mask, layer = Image.new("L", (size, size), 0), pattern_tile(item.colour, item.pattern, size).copy()
    dm, dl = ImageDraw.Draw(mask), ImageDraw.Draw(layer)
    for poly in body:
        dm.polygon(place(poly), fill=255)
        dl.polygon(place(poly), outline=INK)     # outlines drawn before the cut so holes stay clean
    for poly in cut:
        dm.polygon(place(poly), fill=0)
    layer.putalpha(mask)
    dl = ImageDraw.Draw(layer)
    for poly in trim:
        dl.polygon(place(poly), fill=COLOURS[item.trim or item.colour], outline=INK)
    for poly in line:
        dl.line(place(poly), fill=INK, width=max(1, size // 64))
    return layer


def person(items, size, skin, back=False):
    """RGBA figure wearing the items; seen from the back, hair hides the face."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d, u = ImageDraw.Draw(img), size / 100
    arm, leg = [(33, 21), (26, 22), (18, 60), (24, 62), (32, 32)], [(37, 55), (49, 55), (48, 97), (39, 97)]
    for poly in ([(33, 21), (67, 21), (64, 56), (36, 56)], arm, mirror(arm), leg, mirror(leg),
                 [(47, 14), (53, 14), (53, 22), (47, 22)], ellipse(50, 10, 6, 7)):
        d.polygon([(x * u, y * u) for x, y in poly], fill=skin)
    if back:
        d.polygon([(x * u, y * u) for x, y in ellipse(50, 9, 6.5, 7)], fill=HAIR)
    for item in sorted(items, key=lambda it: LAYERS.index(it.category)):
        img.alpha_composite(garment_layer(item, size, False, back))
    return img


def clutter(rng, size):
    """A street scene: a muted ground and random blocks (buildings, cars, passers-by)."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(90, 190) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(6, 12)):
        x, y, w, h = rng.uniform(-10, size), rng.uniform(-10, size), rng.uniform(8, size / 2), rng.uniform(8, size / 2)
        draw = d.rectangle if rng.random() < 0.6 else d.ellipse
        draw([x, y, x + w, y + h], fill=tuple(rng.randint(40, 220) for _ in range(3)))
    return img


def shop_image(item, view, size, rng):
    """Product shot on a plain background; FashionGen has several views: front, back, side, detail."""
    img = Image.new("RGB", (size, size), (236, 236, 236))
    layer = garment_layer(item, size, True, view == "back")
    if view == "side":
        layer = layer.resize((int(size * 0.6), size), Image.BILINEAR)
    elif view == "detail":
        layer = layer.crop((size // 5, size // 5, size - size // 5, size - size // 5)).resize((size, size))
    img.paste(layer, ((size - layer.width) // 2, 0), layer)
    return img


def worn_image(items, view, size, rng):
    """The items on a model: in a studio (front, side, back, full) or in the street, where the scene is
    cluttered and the figure scaled, rotated, shifted, relit and sometimes partly hidden."""
    street = view == "street"
    img = clutter(rng, size) if street else Image.new("RGB", (size, size), tuple(rng.randint(215, 235) for _ in "rgb"))
    layer = person(items, size, rng.choice(SKINS), back=view == "back")
    scale = rng.uniform(0.55, 0.85)
    w, h = {"side": (0.62, 1), "full": (0.75, 0.75), "street": (scale, scale)}.get(view, (1, 1))
    layer = layer.resize((int(size * w), int(size * h)), Image.BILINEAR)
    if not street:
        img.paste(layer, ((size - layer.width) // 2, size - layer.height), layer)
        return img
    layer = layer.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, expand=True)
    x, y = rng.randint(-size // 8, size - layer.width + size // 8), rng.randint(0, max(0, size - layer.height))
    img.paste(layer, (x, y), layer)
    if rng.random() < 0.3:
        x, y = rng.uniform(0, size), rng.uniform(size / 3, size)
        grey = tuple(rng.randint(60, 160) for _ in "rgb")
        ImageDraw.Draw(img).rectangle([x, y, x + size / 4, y + size / 3], fill=grey)
    gain = rng.uniform(0.7, 1.2)
    return img.point(lambda v: min(255, int(v * gain)))


def sketch_image(item, sketcher, size, rng):
    """A black line drawing of the silhouette with a patch hinting at the pattern; each sketcher has a hand."""
    hand = random.Random(f"sketcher-{sketcher}")
    wobble, width, fill = hand.uniform(0.3, 2.2), hand.choice((1, 1, 2)), hand.uniform(0.7, 0.9)
    body, cut, trim, line = shape(item)
    s, ox, oy = fit_transform(body + trim, size, fill)
    ox, oy = ox + hand.uniform(-4, 4), oy + hand.uniform(-4, 4)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for poly in body + cut + trim + line:
        pts = poly + poly[:1] if poly not in line else poly
        halves = [((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in zip(pts, pts[1:])]   # midpoints wobble too
        pts = [p for pair in zip(pts, halves) for p in pair] + pts[-1:]
        d.line([(ox + s * (x + rng.gauss(0, wobble)), oy + s * (y + rng.gauss(0, wobble))) for x, y in pts],
               fill=INK, width=width)
    if item.pattern != "plain":
        x, y = ox + s * np.mean([x for x, _ in body[0]]) - size / 12, oy + s * np.mean([y for _, y in body[0]])
        img.paste(pattern_tile("white", item.pattern, size).crop((0, 0, size // 6, size // 8)), (int(x), int(y)))
    return img


def write_video(path, items, size, rng, frames=8, fps=4):
    """An .mp4 of the figure walking across a street scene (mpeg4: FFmpeg's own encoder, in every PyAV wheel)."""
    scene = clutter(rng, size)
    layer = person(items, size, rng.choice(SKINS)).resize((int(size * 0.75),) * 2, Image.BILINEAR)
    x0, x1 = rng.randint(-size // 6, size // 8), rng.randint(size // 8, size // 3)
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt, stream.codec_context.thread_count, stream.options = "yuv420p", 1, {"qscale": "3"}
        for t in range(frames):
            frame = scene.copy()
            x, y = round(x0 + (x1 - x0) * t / (frames - 1)), size - layer.height - (t % 2) * size // 48
            frame.paste(layer, (x, y), layer)
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


# ----------------------------------------------------------------------------------------------------------------
# U-FIRE-mini, part 2: words. Descriptions and modification texts come from the attributes with several
# phrasings; every task has 4 instruction templates (4 verbs before one request), as U-FIRE's have.

NOUNS = {"t-shirt": ("t-shirt", "tee", "top"), "shirt": ("shirt", "button-up shirt", "blouse"), "skirt": ("skirt",),
         "dress": ("dress", "frock"), "coat": ("coat", "jacket", "overcoat"), "trousers": ("trousers", "pants"),
         "sneaker": ("sneakers", "trainers"), "boot": ("boots", "ankle boots"), "heel": ("heels", "pumps"),
         "sandal": ("sandals",)}
WORDS = {   # (attribute, value) -> (adjective, phrase after "with" or "has")
    ("pattern", "plain"): ("plain", "no pattern"), ("pattern", "striped"): ("striped", "stripes"),
    ("pattern", "dotted"): ("polka-dot", "dots"), ("pattern", "checked"): ("checked", "a check pattern"),
    ("sleeve", "sleeveless"): ("sleeveless", "no sleeves"), ("sleeve", "short"): ("short-sleeved", "short sleeves"),
    ("sleeve", "long"): ("long-sleeved", "long sleeves"), ("neckline", "round"): ("crew-neck", "a round neckline"),
    ("neckline", "v-neck"): ("v-neck", "a v neckline"), ("neckline", "square"): ("square-neck", "a square neckline"),
    ("neckline", "pointed collar"): ("pointed-collar", "a pointed collar"),
    ("neckline", "round collar"): ("round-collar", "a rounded collar"),
    ("neckline", "band collar"): ("band-collar", "a band collar"),
    ("neckline", "collarless"): ("collarless", "no collar"),
    ("neckline", "lapel"): ("lapelled", "notched lapels"), ("neckline", "hood"): ("hooded", "a hood"),
    ("length", "mini"): ("mini", "a mini length"), ("length", "knee"): ("knee-length", "a knee-length hem"),
    ("length", "maxi"): ("maxi", "a floor-length hem"), ("length", "shorts"): ("short", "short legs"),
    ("length", "cropped"): ("cropped", "cropped legs"), ("length", "full"): ("full-length", "full-length legs"),
    ("length", "short"): ("short", "a short cut"), ("length", "long"): ("long", "a long cut"),
    ("style", "straight"): ("straight", "a straight cut"), ("style", "flared"): ("flared", "a flared cut"),
    ("style", "sneaker"): ("sneaker-style", "a sneaker shape"), ("style", "boot"): ("boot-style", "a boot shaft"),
    ("style", "heel"): ("high-heeled", "a high heel"), ("style", "sandal"): ("strappy", "sandal straps"),
}
FILLER = ("relaxed-fit", "cotton", "lightweight", "classic", "tailored", "soft", "everyday", "slim")
VERBS = ("find", "search for", "retrieve", "locate")
REQUESTS = {
    "t2i": "images using the description text: {text}",
    "sketch2i": "real images that resemble the sketch",
    "inshop-plain": "the plain product image of this {cat} worn in the photos",
    "inshop-tryon": "images of this {cat} being tried on",
    "inshop": "other photos of the same {cat}",
    "street2shop": "images corresponding to the {text} in the user's photograph",
    "compatibility": "compatible {cat} go well with the given images",
    "video2img": "images that match the main cloth from the video provided",
    "cir": "{cat} images matching the text modifications of the given image: {text}",
    "sketch&text": "real images that resemble the sketch matching the text: {text}",
    "asfr": "images with the same {attr} with the provided image",
    UNSEEN_TASKS[0]: "{cat} images matching the text modifications to the reference image: {text}",
    UNSEEN_TASKS[1]: "compatible {text} go well with the given images",
}


def words(attr, value):
    if attr in ("colour", "trim"):
        return (value, f"the colour {value}") if attr == "colour" else (f"{value}-soled", f"a {value} sole")
    return WORDS[attr, value]


def noun(item, rng):
    return rng.choice(NOUNS[item.style if item.category == "shoes" else item.category])


def describe(item, rng, filler=False):
    """Every attribute named once, as an adjective or a "with" phrase, in varying order (shoes: by the noun)."""
    adjs, withs = [], []
    for attr, value in item.attrs()[1:]:
        if not (attr == "style" and item.category == "shoes"):
            adj, phrase = words(attr, value)
            adjs.append(adj) if rng.random() < 0.55 else withs.append(phrase)
    rng.shuffle(adjs)
    rng.shuffle(withs)
    in_colour = rng.random() < 0.3
    text = " ".join(rng.sample(FILLER, int(filler)) + adjs + [item.colour] * (not in_colour) + [noun(item, rng)])
    return text + f" in {item.colour}" * in_colour + (" with " + " and ".join(withs) if withs else "")


def modification(ref, target, rng):
    """FashionIQ-style relative caption: how the target differs from the reference."""
    parts = []
    for (attr, old), (_, new) in zip(ref.attrs(), target.attrs()):
        if old != new:
            (adj, phrase), was = words(attr, new), words(attr, old)[0]
            parts.append(rng.choice((f"is {adj}", f"has {phrase}", f"is {adj} instead of {was}",
                                     f"{adj} rather than {was}")))
    rng.shuffle(parts)
    return " and ".join(parts)


# The hidden compatibility rule: an outfit keeps to one colour pair, has at most one patterned piece, and its
# shoes follow the lower garment (heels or sandals with a dress or skirt, sneakers or boots with trousers).
COLOUR_PAIRS = (("red", "black"), ("blue", "white"), ("yellow", "purple"), ("green", "brown"), ("orange", "pink"))
OUTFIT_NAMES = {"t-shirt": "top", "shirt": "top", "dress": "dress", "coat": "outwear", "trousers": "pants",
                "skirt": "skirt", "shoes": "shoes"}
ASFR_ATTRIBUTES = {   # (attribute name, item field, categories it applies to); each pool image is labelled once
    "9_asfr_DARN": (("clothes category", "category", CLOTHES), ("clothes color", "colour", CLOTHES),
                    ("clothes pattern", "pattern", CLOTHES), ("sleeve length", "sleeve", ("t-shirt", "shirt", "dress")),
                    ("clothes length", "length", ("dress", "coat", "trousers", "skirt"))),
    "9_asfr_FashionAI": (("sleeve length", "sleeve", ("t-shirt", "shirt", "dress")),
                         ("neckline design", "neckline", ("t-shirt", "dress")),
                         ("collar design", "neckline", ("shirt",)), ("lapel design", "neckline", ("coat",)),
                         ("skirt length", "length", ("skirt", "dress")),
                         ("pant length", "length", ("trousers",)), ("coat length", "length", ("coat",))),
}
# Queries per split at --scale 1: U-FIRE's proportions (gallery sizes in docs/method.md#data) scaled down so a CPU
# quickstart trains in minutes, except that the sketch sets, CSTBIR and DARN train on 2-4x their share: at their
# share (60-120 records) the tiny model's sketch Recall@10 stayed within 0.7-1.6x chance, at these sizes it reaches
# 2.3-3.7x (README, Results). DARN stays at chance either way.
SIZES = {"1_t2i_FashionGen": (700, 100, 150), "1_t2i_Shoes": (150, 50, 60), "2_sketch2i_ClothesV1": (240, 30, 30),
         "2_sketch2i_HAIFashion": (300, 40, 60), "2_sketch2i_QMUL-Shoe-V2": (240, 30, 40),
         "3_inshop_DeepFashion": (400, 80, 120), "4_street2shop_DeepFashion2": (300, 80, 100),
         "5_compatibility_FashionVC": (200, 60, 80), "5_compatibility_Polyvore": (250, 60, 100),
         "6_video2img_MovingFashion": (150, 40, 60), "7_cir_Fashion200K": (200, 50, 80),
         "7_cir_FashionIQ-Dress": (200, 60, 80), "7_cir_FashionIQ-Shirt": (200, 60, 80),
         "7_cir_FashionIQ-Toptee": (200, 60, 80), "7_cir_Shoes": (150, 50, 60), "8_sketch&text_CSTBIR": (240, 40, 60),
         "9_asfr_DARN": (400, 60, 80), "9_asfr_FashionAI": (250, 60, 100)}
UNSEEN_QUERIES, SKETCHERS = 100, 20


# ----------------------------------------------------------------------------------------------------------------
# U-FIRE-mini, part 3: records. A Mini holds the catalogue, the structural RNG and the file writer.

class Mini:
    def __init__(self, out, seed, size):
        self.out, self.seed, self.size = out, seed, size
        self.rng = random.Random(seed)
        self.written, self.counter, self.polyvore_test = set(), itertools.count(), []
        combos = [(c, colour, pattern, dict(zip(spec, values))) for c, spec in CATEGORIES.items() for colour in COLOURS
                  for pattern in PATTERNS for values in itertools.product(*spec.values())]
        items = [Item(f"{i:05d}", c, colour, pattern, **more) for i, (c, colour, pattern, more) in enumerate(combos)]
        # Items, not images, are split 60/20/20, and a record's pictures show items of its split, except CIR
        # references (change) and compatibility outfits, drawn from the whole catalogue (docs/results.md#u-fire-mini).
        self.rng.shuffle(items)
        self.split_of = {it: SPLITS[(k >= 0.6 * len(items)) + (k >= 0.8 * len(items))] for k, it in enumerate(items)}
        self.by_key, self.by_cat = {it.key(): it for it in items}, defaultdict(list)
        for it in items:
            self.by_cat[self.split_of[it], it.category].append(it)
            self.by_cat["any", it.category].append(it)

    def change(self, item, attrs):
        """The catalogue item equal to `item` but for new random values of `attrs`, whatever its split."""
        new = {a: self.rng.choice([v for v in choices(item.category, a) if v != getattr(item, a)]) for a in attrs}
        return self.by_key[dataclasses.replace(item, **new).key()]

    def pool(self, split, n, categories):
        """n items of the split drawn in families (an item and up to two variants differing in one attribute), so
        galleries hold hard distractors; items repeat only once the categories are used up."""
        chosen, seen, budget = [], set(), sum(len(self.by_cat[split, c]) for c in categories)
        while len(chosen) < n:
            seen = set() if len(seen) >= budget else seen
            base = self.rng.choice(self.by_cat[split, self.rng.choice(categories)])
            variants = [self.by_key[dataclasses.replace(base, **{a: v}).key()]
                        for a, old in base.attrs() for v in choices(base.category, a) if v != old]
            variants = [it for it in variants if self.split_of[it] == split]
            for it in [base] + self.rng.sample(variants, min(2, len(variants))):
                if it not in seen and len(chosen) < n:
                    seen.add(it)
                    chosen.append(it)
        return chosen

    def pick(self, split, category, **allowed):
        return self.rng.choice([it for it in self.by_cat[split, category]
                                if all(getattr(it, a) in v for a, v in allowed.items())])

    def companion(self, item, split):
        """The rest of the outfit in a photo: tops get a bottom, bottoms and coats a top, dresses nothing."""
        if item.category == "dress":
            return []
        return [self.pick(split, self.rng.choice(BOTTOMS if item.category in TOPS else TOPS))]

    def instruction(self, task, **fields):
        return f"{self.rng.choice(VERBS)} {REQUESTS[task]}".format(**fields)

    def save(self, rel, render):
        """Write a file once; its content comes from an RNG seeded by (seed, path), so order never matters."""
        if rel not in self.written:
            path = os.path.join(self.out, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image = render(random.Random(f"{self.seed}/{rel}"), path)
            if image is not None:   # videos write themselves
                image.save(path, quality=90) if rel.endswith(".jpg") else image.save(path)
            self.written.add(rel)
        return rel

    def shop(self, folder, split, item, view="front", stem=None):
        return self.save(f"{folder}/{stem or f'{split}+{item.uid}+{view}'}.jpg",
                         lambda rng, _: shop_image(item, view, self.size, rng))

    def worn(self, folder, split, items, view, stem=None):
        # "worn-" keeps a try-on view's name apart from the shop shot of the same view (shop(): "+front").
        if stem is None:
            name = f"street{next(self.counter)}" if view == "street" else f"worn-{view}"
            stem = f"{split}+{items[0].uid}+{name}"
        return self.save(f"{folder}/{stem}.jpg", lambda rng, _: worn_image(items, view, self.size, rng))

    def sketch(self, folder, split, item, sketcher, stem=None):
        return self.save(f"{folder}/{stem or f'{split}+{item.uid}+sketch{sketcher}'}.png",
                         lambda rng, _: sketch_image(item, sketcher, self.size, rng))

    def record(self, key, split, i, instruction, targets, task=None, **fields):
        family, dataset = SUB_DATASETS[key]
        return {"id": f"{family}_{dataset}_{split}_{i + 1:07d}", **fields,
                "instruction_text": instruction, "target_image": list(targets), "task": task or family,
                "dataset": dataset, "split": split}


def dataset_folder(key):
    dataset = SUB_DATASETS[key][1]   # as in the release: Shoes_images serves two sub-datasets, FashionIQ nests
    return f"FashionIQ_images/{dataset[10:]}_images" if dataset.startswith("FashionIQ-") else f"{dataset}_images"


# Queries about one catalogue item (the target): each returns the record's fields.

def t2i_query(g, key, folder, split, item, pool):
    views = ["front"] + g.rng.sample(("back", "side", "detail"), g.rng.randint(0, 3)) * (key == "1_t2i_FashionGen")
    text = describe(item, g.rng, filler=key == "1_t2i_FashionGen")
    return dict(instruction=g.instruction("t2i", text=text), targets=[g.shop(folder, split, item, v) for v in views],
                query_text=text)


def sketch2i_query(g, key, folder, split, item, pool):   # 1-5 sketches of the item, each by another hand
    hands = g.rng.sample(range(SKETCHERS), 1 if key == "2_sketch2i_HAIFashion" else g.rng.randint(1, 5))
    return dict(instruction=g.instruction("sketch2i"), targets=[g.shop(folder, split, item)],
                query_image=[g.sketch(folder, split, item, h) for h in hands])


def inshop_query(g, key, folder, split, item, pool):
    task, flat = g.rng.choice(("inshop-plain", "inshop-tryon", "inshop")), g.shop(folder, split, item)
    views = g.rng.sample(("front", "side", "back", "full"), g.rng.randint(1, 3))
    worn = [g.worn(folder, split, [item], v) for v in views]
    query, targets = {"inshop-plain": (worn, [flat]), "inshop-tryon": ([flat], worn),
                      "inshop": (worn[:1], worn[1:] or [flat])}[task]
    return dict(instruction=g.instruction(task, cat=noun(item, g.rng)), targets=targets, task=task, query_image=query)


def what(item, rng):   # "long-sleeved dress"
    return " ".join(([words("sleeve", item.sleeve)[0]] if item.sleeve else []) + [noun(item, rng)])


def street2shop_query(g, key, folder, split, item, pool):
    photos = [g.worn(folder, split, [item] + g.companion(item, split), "street")
              for _ in range(g.rng.choice((1, 1, 2, 3)))]
    targets = [g.shop(folder, split, item)] + [g.shop(folder, split, item, "back")] * (g.rng.random() < 0.3)
    return dict(instruction=g.instruction("street2shop", text=what(item, g.rng)), query_image=photos, targets=targets,
                task="street2shop-multi-query" if len(photos) > 1 else "street2shop-one-query")


def video2img_query(g, key, folder, split, item, pool):
    outfit = [item] + g.companion(item, split)
    video = g.save(f"MovingFashion_videos/{split}+{item.uid}.mp4",
                   lambda rng, path: write_video(path, outfit, g.size, rng))
    return dict(instruction=g.instruction("video2img"), targets=[g.shop(folder, split, item)], query_video=[video])


def cir_query(g, key, folder, split, item, pool):
    """Reference + modification -> target. Fashion200K only names a colour or pattern swap ("replace red with
    blue"), so every pool item with the target's category, colour and pattern is a correct answer."""
    dataset = SUB_DATASETS[key][1]
    if dataset == "Fashion200K":
        attr = g.rng.choice(("colour", "pattern"))
        ref = g.change(item, [attr])
        text = f"replace {words(attr, getattr(ref, attr))[0]} with {words(attr, getattr(item, attr))[0]}"
        same = [it for it in pool if (it.category, it.colour, it.pattern) == (item.category, item.colour, item.pattern)]
    else:
        ref = g.change(item, g.rng.sample([a for a, _ in item.attrs()], 1 + (g.rng.random() < 0.4)))
        text, same = modification(ref, item, g.rng), []
    cat = {"Fashion200K": noun(item, g.rng), "Shoes": "shoes"}.get(dataset, dataset[10:].lower())   # FashionIQ-X: x
    targets = [g.shop(folder, split, it) for it in dict.fromkeys([item] + same)]
    return dict(instruction=g.instruction("cir", cat=cat, text=text), query_text=text,
                query_image=[g.shop(folder, split, ref)], targets=targets)


def sketch_text_query(g, key, folder, split, item, pool):
    """CSTBIR: a sketch of one garment + a sentence giving its colour and the rest of the outfit -> the photo."""
    others = g.companion(item, split)
    text = g.rng.choice(("a person wearing a {c} provided sketch{r}.", "someone in a {c} provided sketch{r}.",
                         "a {c} provided sketch worn on the street{r}.")).format(
        c=item.colour, r="".join(f" and {o.colour} {noun(o, g.rng)}" for o in others))
    sketch = g.sketch(folder, split, item, g.rng.randrange(SKETCHERS), stem=f"QuickDraw+{split}+{item.uid}")
    photo = g.worn(folder, split, [item] + others, "street", stem=f"VG_images+{split}+{item.uid}")
    return dict(instruction=g.instruction("sketch&text", text=text), query_text=text, query_image=[sketch],
                targets=[photo])


ITEM_QUERIES = {"t2i": t2i_query, "sketch2i": sketch2i_query, "inshop": inshop_query, "street2shop": street2shop_query,
                "video2img": video2img_query, "cir": cir_query, "sketch&text": sketch_text_query}
ITEM_CATEGORIES = {"1_t2i_FashionGen": CLOTHES + ("shoes",), "1_t2i_Shoes": ("shoes",), "7_cir_Shoes": ("shoes",),
                   "2_sketch2i_QMUL-Shoe-V2": ("shoes",), "7_cir_FashionIQ-Dress": ("dress",),
                   "7_cir_FashionIQ-Shirt": ("shirt",), "7_cir_FashionIQ-Toptee": ("t-shirt",)}


def build_items(g, key, split, n):
    """One query per pool item; the last quarter of the pool only adds distractors to the test gallery."""
    family, folder = SUB_DATASETS[key][0], dataset_folder(key)
    pool = g.pool(split, n + n // 3, ITEM_CATEGORIES.get(key, CLOTHES))
    records = [g.record(key, split, i, **ITEM_QUERIES[family](g, key, folder, split, it, pool))
               for i, it in enumerate(pool[:n])]
    return records, [g.worn(folder, split, [it] + g.companion(it, split), "street") if family == "sketch&text"
                     else g.shop(folder, split, it) for it in pool[n:]]


def build_compatibility(g, key, split, n):
    """Outfits following the hidden rule. FashionVC: a top for a bottom or back; Polyvore: 3-4 pieces, each piece
    once the missing one. Returns the records and every outfit image (the test gallery). Pieces come from the
    whole catalogue (one split's third would leave some colour-pattern-style combinations empty)."""
    folder, records, images, polyvore = dataset_folder(key), [], [], key.endswith("Polyvore")
    for number in itertools.count(SPLITS.index(split) * 10 ** 6 + 1):
        if len(records) >= n and len(images) >= n + n // 3:
            return records, images
        pieces = [g.rng.choice(TOPS), g.rng.choice(BOTTOMS)] if not polyvore or g.rng.random() < 0.6 else ["dress"]
        pieces += (["shoes"] + ["coat"] * (g.rng.random() < 0.4)) if polyvore else []
        pair, patterned = g.rng.choice(COLOUR_PAIRS), g.rng.randrange(len(pieces) + 1)
        shoes = ("heel", "sandal") if {"dress", "skirt"} & set(pieces) else ("sneaker", "boot")
        items = [g.pick("any", c, colour=pair, pattern=PATTERNS[1:] if k == patterned else ("plain",),
                        **({"style": shoes} if c == "shoes" else {})) for k, c in enumerate(pieces)]
        names = [OUTFIT_NAMES[c] if polyvore else "top" if c in TOPS else "bottom" for c in pieces]
        paths = [g.shop(folder, split, it, stem=f"{name}+{number}" + f"_{j + 1}" * polyvore)
                 for j, (it, name) in enumerate(zip(items, names))]
        images += paths
        if split == "test" and polyvore:   # the evaluation-only compatible-item task draws on these
            g.polyvore_test.append((items, paths, names))
        for t in range(len(items)) if polyvore else [g.rng.randrange(2)]:
            if len(records) < n:
                records.append(g.record(key, split, len(records), g.instruction("compatibility", cat=names[t]),
                                        [paths[t]], task=f"compatibility-{names[t]}",
                                        query_image=paths[:t] + paths[t + 1:]))


def build_asfr(g, key, split, n):
    """A pool whose images are each labelled for one attribute (as in DARN and FashionAI), and queries: an image
    and an attribute -> every pool image with the same value; up to 10 positives and 50 negatives listed."""
    dataset, folder, spec = SUB_DATASETS[key][1], dataset_folder(key), ASFR_ATTRIBUTES[key]

    def label(k, item):
        name, field, cats = spec[k]
        if dataset == "FashionAI":
            return f"FashionAI+{name}+{getattr(item, field)}"
        values = CLOTHES if field == "category" else sorted({v for c in cats for v in choices(c, field)})
        return f"DARN+{k}+{values.index(getattr(item, field))}"   # DARN labels are attribute and value indices

    applicable = lambda item: [k for k, (_, _, cats) in enumerate(spec) if item.category in cats]
    pool = [(item, g.rng.choice(applicable(item))) for item in g.pool(split, 3 * n, CLOTHES)]
    labels, by_attribute = defaultdict(list), defaultdict(list)
    view = "street" if dataset == "DARN" else "front"
    for j, (item, k) in enumerate(pool):   # one file per pool entry, so no file gets two labels
        labels[label(k, item)].append(g.worn(folder, split, [item], view, stem=f"{split}+{item.uid}+pool{j}"))
        by_attribute[k].append((label(k, item), labels[label(k, item)][-1]))
    records = []
    for item in itertools.cycle(g.pool(split, 2 * n, CLOTHES) + [item for item, _ in pool]):   # pool items match
        if len(records) >= n:
            return records, dict(labels)
        k = g.rng.choice(applicable(item))
        if label(k, item) in labels:
            positives, negatives = labels[label(k, item)], [p for lab, p in by_attribute[k] if lab != label(k, item)]
            records.append(g.record(
                key, split, len(records), g.instruction("asfr", attr=spec[k][0]),
                g.rng.sample(positives, min(10, len(positives))),
                query_image=[g.worn(folder, split, [item], view if dataset == "DARN" else "side",
                                    stem=f"{split}+{item.uid}+query{len(records)}")],
                negative_image=g.rng.sample(negatives, min(50, len(negatives))), attribute=spec[k][0],
                target_label=label(k, item)))


def build_unseen(g, task, n):
    """An evaluation-only task in its bare-file-name format: (records, candidate names)."""
    records, candidates, bare = [], [], os.path.basename
    if task == UNSEEN_TASKS[0]:   # street photo + "change the short sleeve top from black to white" -> shop image
        folder = f"evaluation_only_tasks/{task}/images"
        for i, target in enumerate(g.pool("test", n, CLOTHES)):
            ref = g.change(target, ["colour"])
            cat = {**OUTFIT_NAMES, "trousers": "bottom", "skirt": "bottom"}[target.category]
            query = bare(g.worn(folder, "test", [ref], "street", stem=f"{cat}+{2 * i + 1:06d}"))
            shop = bare(g.shop(folder, "test", target, stem=f"{cat}+{2 * i + 2:06d}"))
            text = f"change the {what(ref, g.rng)} from {ref.colour} to {target.colour}"
            records.append({"id": f"{i + 1:07d}", "query_image": [query], "query_text": text,
                            "instruction_text": g.instruction(task, cat=cat, text=text), "target_image": [shop]})
            candidates += [query, shop]
    for items, paths, names in g.polyvore_test if task == UNSEEN_TASKS[1] else []:   # outfit + description -> piece
        candidates += [bare(p) for p in paths]
        for t in range(len(items)):
            if len(records) < n:
                text = describe(items[t], g.rng)
                records.append({"id": f"{len(records) + 1:07d}", "query_text": text,
                                "query_image": [bare(p) for p in paths[:t] + paths[t + 1:]],
                                "instruction_text": g.instruction(task, text=text),
                                "target_image": [bare(paths[t])], "category": names[t]})
    return records, list(dict.fromkeys(candidates))


def generate(out="data/ufire-mini", seed=0, scale=1.0, image_size=96, progress=True):
    """Write U-FIRE-mini to `out`, replacing it, through a temporary folder: a failure leaves nothing behind."""
    if image_size < 32 or image_size % 2:
        raise ValueError(f"--image-size must be even and at least 32, got {image_size}")
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        g = Mini(tmp, seed, image_size)
        with tqdm(total=len(SUB_DATASETS) + len(UNSEEN_TASKS), desc="U-FIRE-mini", disable=not progress) as bar:
            for key, (family, dataset) in SUB_DATASETS.items():
                bar.set_postfix_str(f"{key}, {len(g.written)} files")
                build = {"compatibility": build_compatibility, "asfr": build_asfr}.get(family, build_items)
                for s, split in enumerate(SPLITS):
                    records, extra = build(g, key, split, max(2, round(SIZES[key][s] * scale)))
                    write_json(triplet_path(tmp, key, split), records)
                    if family == "asfr" and split != "train":
                        extra[f"{dataset}_asfr_{split}_candidate"] = [p for paths in extra.values() for p in paths]
                        write_json(candidate_path(tmp, key, split), extra)
                    elif split == "test":
                        gallery = list(dict.fromkeys([p for r in records for p in r["target_image"]] + extra))
                        # The release lists 71 DeepFashion images twice; so do we, to keep readers honest.
                        write_json(candidate_path(tmp, key, split), gallery + gallery[:3] * (family == "inshop"))
                bar.update()
            for task in UNSEEN_TASKS:
                records, candidates = build_unseen(g, task, max(2, round(UNSEEN_QUERIES * scale)))
                write_json(os.path.join(tmp, "evaluation_only_tasks", task, "triplet_data.json"), records)
                write_json(os.path.join(tmp, "evaluation_only_tasks", task, "candidate_images.json"), candidates)
                bar.update()
        if os.path.exists(out):   # swap the new tree in, then drop the old one
            os.rename(out, f"{tmp}-old")
        os.rename(tmp, out)
        shutil.rmtree(f"{tmp}-old", ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
