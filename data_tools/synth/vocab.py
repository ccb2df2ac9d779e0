"""The small, regular vocabulary of the generated dataset: colours, textures, shapes, composite objects.

Kept deliberately tiny so that a tiny model with a tiny tokenizer can learn it; every word a text can use
comes from the tables here or from the sentence templates in `texts.py`.
"""

from __future__ import annotations

# Object colours: name -> RGB. Far apart in RGB and from the (pale or dark-gray) backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
    "cyan": (40, 200, 210),
    "black": (25, 25, 25),
}

# Backgrounds: colour name -> RGB, and the patterns drawn on them.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "light gray": (200, 200, 200),
    "beige": (235, 222, 195),
    "pale blue": (200, 220, 240),
    "pale green": (205, 235, 205),
    "dark gray": (80, 80, 80),
}
BACKGROUND_PATTERNS = ("plain", "gradient", "noisy", "grid")

TEXTURES = ("solid", "striped", "dotted", "checkered")

# Simple shapes (one region, no parts). "ring" and "frame" have holes; "x" is a diagonal cross.
SHAPES = ("circle", "ellipse", "square", "triangle", "diamond", "star", "ring", "frame", "cross", "x")

# Composite objects: name -> parts in drawing order (later parts are drawn on top of earlier ones),
# and the part whose colour names the whole object ("a yellow house" has a yellow body).
COMPOSITES: dict[str, tuple[str, ...]] = {
    "house": ("body", "roof", "door", "window"),
    "flower": ("stem", "petals", "center"),
    "robot": ("arm", "leg", "body", "head"),
    "tree": ("trunk", "crown"),
}
MAIN_PART = {"house": "body", "flower": "petals", "robot": "body", "tree": "crown"}

# Size classes by the object's unoccluded area as a fraction of the image area (upper bounds).
SIZE_CLASSES = (("small", 0.025), ("medium", 0.07), ("large", 1.0))

# Position in a 3x3 grid of the image, by the centroid of the visible mask: [row][column].
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def size_class(area_fraction: float) -> str:
    """The size word for an unoccluded area given as a fraction of the image area."""
    for name, upper in SIZE_CLASSES:
        if area_fraction < upper:
            return name
    return SIZE_CLASSES[-1][0]


def position_name(cx: float, cy: float, width: int, height: int) -> str:
    """The 3x3-grid position word of a point (pixel coordinates)."""
    col = min(int(3 * cx / width), 2)
    row = min(int(3 * cy / height), 2)
    return POSITIONS[row][col]
