"""Ground-truth texts of a scene: names, captions, relations, descriptions and question-answer turns.

Everything is derived from the scene's exact masks and attributes, from a few fixed sentence templates, so
the vocabulary stays small and every answer is checkable. Regions are referred to as `<regionK>` (1-based,
in the order of the record's `annotation`), as in Osprey-724K.
"""

from __future__ import annotations

import numpy as np

from data_tools.synth.scene import Part, Scene, SceneObject, visible_parts
from data_tools.synth.vocab import COLORS, NUMBER_WORDS, POSITIONS, SHAPES, TEXTURES

ALL_POSITIONS = tuple(p for row in POSITIONS for p in row)
RELATION_MARGIN = 0.08  # centroids closer than this fraction of the image are neither left/right nor above/below


def name(obj: SceneObject) -> str:
    """'small red striped triangle' (no article); composites carry no texture word."""
    words = [obj.size, obj.color]
    if obj.texture != "solid":
        words.append(obj.texture)
    words.append(obj.category)
    return " ".join(words)


def caption(obj: SceneObject) -> str:
    """Short caption: 'a small red striped triangle'."""
    return "a " + name(obj)


def article(word: str) -> str:
    """'an' before a vowel sound ('an ellipse', 'an x'), else 'a'."""
    return "an" if word[0] in "aeiox" else "a"


def where(position: str) -> str:
    """'in the top left of the image' / 'in the center of the image'."""
    return f"in the {position} of the image"


def join_words(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def parts_phrase(obj: SceneObject) -> str:
    """'a red roof, an orange door and pink petals' (visible parts only, drawing order)."""
    return join_words([f"{p.color} {p.name}" if p.name.endswith("s") else f"{article(p.color)} {p.color} {p.name}"
                       for p in visible_parts(obj)])


def relations(objects: list[SceneObject], i: int, j: int, size: int) -> list[str]:
    """Relation phrases of object i with respect to object j, most specific first ('inside', ...)."""
    a, b = objects[i], objects[j]
    out: list[str] = []
    if a.group == "nested" and a.partner == j:
        out.append("inside" if (a.full & ~b.filled).sum() == 0 else "around")
    if a.group == "same_box" and a.partner == j and a.bbox == b.bbox:
        out.append("in the same box as")
    if i in b.occluders:
        out.append("in front of")
    elif j in a.occluders:
        out.append("behind")
    dx = a.centroid[0] - b.centroid[0]
    dy = a.centroid[1] - b.centroid[1]
    margin = RELATION_MARGIN * size
    if dx < -margin:
        out.append("to the left of")
    elif dx > margin:
        out.append("to the right of")
    if dy < -margin:
        out.append("above")
    elif dy > margin:
        out.append("below")
    return out


def image_caption(scene: Scene) -> str:
    """Stage-1 caption: the objects left to right and the background."""
    ordered = sorted(scene.objects, key=lambda o: o.centroid[0])
    count = NUMBER_WORDS[len(ordered)] if len(ordered) < len(NUMBER_WORDS) else str(len(ordered))
    noun = "object" if len(ordered) == 1 else "objects"
    pattern = {
        "plain": f"a plain {scene.background_color} background",
        "gradient": f"a {scene.background_color} gradient background",
        "noisy": f"a noisy {scene.background_color} background",
        "grid": f"a {scene.background_color} background with a grid",
    }[scene.background_pattern]
    return f"{count.capitalize()} {noun} on {pattern}: {join_words([caption(o) for o in ordered])}."


def detailed_description(scene: Scene, i: int) -> str:
    """Several sentences about object i: what it is, where, its neighbours, occlusion and its hard partner."""
    objects = scene.objects
    obj = objects[i]
    sentences = [f"This is {caption(obj)}."]
    if obj.is_composite:
        sentences.append(f"It has {parts_phrase(obj)}.")
    sentences.append(f"It is {where(obj.position)}.")
    if obj.partner is not None:
        partner = objects[obj.partner]
        rel = relations(objects, i, obj.partner, scene.size)
        if rel and rel[0] == "inside":
            sentences.append(f"It sits inside {caption(partner)}.")
        elif rel and rel[0] == "around":
            sentences.append(f"It surrounds {caption(partner)}.")
        elif rel and rel[0] == "in the same box as":
            sentences.append(f"It shares its bounding box with {caption(partner)}.")
    # Up to two nearest neighbours, by centroid distance, with their spatial relation.
    others = sorted(
        (j for j in range(len(objects)) if j != i and j != obj.partner),
        key=lambda j: np.hypot(objects[j].centroid[0] - obj.centroid[0], objects[j].centroid[1] - obj.centroid[1]),
    )
    for j in others[:2]:
        spatial = [r for r in relations(objects, i, j, scene.size) if r.startswith(("to the", "above", "below"))]
        if spatial:
            sentences.append(f"It is {' and '.join(spatial)} {caption(objects[j])}.")
    hidden_by = [j for j in obj.occluders if j != obj.partner]
    if hidden_by:
        sentences.append(f"Part of it is hidden by {join_words([caption(objects[j]) for j in hidden_by])}.")
    covers = [j for j, o in enumerate(objects) if i in o.occluders and j != obj.partner]
    if covers:
        sentences.append(f"It covers part of {join_words([caption(objects[j]) for j in covers])}.")
    return " ".join(sentences)


def _other(rng: np.random.Generator, options, value: str) -> str:
    choices = [o for o in options if o != value]
    return choices[int(rng.integers(len(choices)))]


def _pick_turns(rng: np.random.Generator, turns: list[tuple[str, str]], max_turns: int) -> list[tuple[str, str]]:
    """At most `max_turns` of `turns`, in a random order. The turns are built region by region, and these records
    once kept that order (region 1's question first, then region 2's ...): version 6, trained on them, learned to
    take the t-th listed region for the t-th question rather than the region the question names (docs/finetune.md,
    "The cause found"). Asked in a random order, a question's turn says nothing about its region."""
    return [turns[t] for t in rng.permutation(len(turns))[:max_turns]]


def short_form_turns(rng: np.random.Generator, scene: Scene, order: list[int], max_turns: int = 5) -> list[tuple[str, str]]:
    """(question, one-word-or-phrase answer) pairs; `order[k]` is the object shown as region k+1."""
    turns: list[tuple[str, str]] = []
    for k, i in enumerate(order):
        obj, tag = scene.objects[i], f"<region{k + 1}>"
        options = [
            (f"What is the object in {tag}?", obj.category),
            (f"What color is {tag}?", obj.color),
            (f"What size is {tag}?", obj.size),
            (f"Where is {tag} in the image?", obj.position),
        ]
        if not obj.is_composite:
            options.append((f"What is the texture of {tag}?", obj.texture))
        turns.append(options[int(rng.integers(len(options)))])
    # One counting question over all listed regions.
    color = scene.objects[order[int(rng.integers(len(order)))]].color
    count = sum(scene.objects[i].color == color for i in order)
    turns.append((f"How many of the regions are {color}?", NUMBER_WORDS[count]))
    return _pick_turns(rng, turns, max_turns)


def pos_neg_turns(rng: np.random.Generator, scene: Scene, order: list[int], max_turns: int = 6) -> list[tuple[str, str]]:
    """Yes/no questions, half true and half false. False ones prefer the attribute of the object's hard
    partner (same box or nested), so that only the mask separates the two."""
    turns: list[tuple[str, str]] = []
    for k, i in enumerate(order):
        obj, tag = scene.objects[i], f"<region{k + 1}>"
        partner = scene.objects[obj.partner] if obj.partner is not None else None
        kinds = ["category", "color", "position"] + ([] if obj.is_composite else ["texture"])
        kind = kinds[int(rng.integers(len(kinds)))]
        truth = {"category": obj.category, "color": obj.color, "position": obj.position, "texture": obj.texture}[kind]
        if rng.random() < 0.5:
            value, answer = truth, "Yes"
        else:
            partner_value = None if partner is None else getattr(partner, kind)
            if partner_value is not None and partner_value != truth:
                value = partner_value
            else:
                pool = {"category": SHAPES, "color": COLORS, "position": ALL_POSITIONS, "texture": TEXTURES}[kind]
                value = _other(rng, pool, truth)
            answer = "No"
        question = {
            "category": f"Is there {article(value)} {value} in {tag}?",
            "color": f"Is {tag} {value}?",
            "position": f"Is {tag} {where(value)}?",
            "texture": f"Is {tag} {value}?",
        }[kind]
        turns.append((question, answer))
    return _pick_turns(rng, turns, max_turns)


def conversation_turns(rng: np.random.Generator, scene: Scene, order: list[int], max_turns: int = 6) -> list[tuple[str, str]]:
    """Free-form question-answer turns in sentences, about single regions and pairs of regions."""
    objects = scene.objects
    region_of = {i: k + 1 for k, i in enumerate(order)}
    turns: list[tuple[str, str]] = []
    for i in order:
        obj, k = objects[i], region_of[i]
        options = [
            (f"What can you see in <region{k}>?", f"There is {caption(obj)} in region{k}."),
            (f"What color is the object in <region{k}>?", f"The {obj.category} in region{k} is {obj.color}."),
            (f"Where is <region{k}> located?", f"The {obj.category} in region{k} is {where(obj.position)}."),
        ]
        if obj.is_composite:
            options.append((f"What parts does <region{k}> have?", f"The {obj.category} in region{k} has {parts_phrase(obj)}."))
        if obj.occluders:
            j = obj.occluders[0]
            options.append((f"Is <region{k}> fully visible?",
                            f"No, part of it is hidden by the {name(objects[j])} in region{region_of[j]}."))
        else:
            options.append((f"Is <region{k}> fully visible?", "Yes, nothing covers it."))
        turns.append(options[int(rng.integers(len(options)))])
    # Pair questions: the hard partner first, then random pairs.
    pairs = [(i, objects[i].partner) for i in order if objects[i].partner is not None]
    if len(order) >= 2:
        a, b = rng.choice(len(order), size=2, replace=False)
        pairs.append((order[int(a)], order[int(b)]))
    for i, j in pairs[:2]:
        rel = relations(objects, i, j, scene.size)
        if not rel:
            continue
        ki, kj = region_of[i], region_of[j]
        turns.append((
            f"How is <region{ki}> related to <region{kj}>?",
            f"The {name(objects[i])} in region{ki} is {rel[0]} the {name(objects[j])} in region{kj}.",
        ))
    return _pick_turns(rng, turns, max_turns)


def part_regions(scene: Scene) -> list[tuple[SceneObject, Part]]:
    """All visible parts of the composite objects, back to front."""
    return [(obj, part) for obj in scene.objects if obj.is_composite for part in visible_parts(obj)]


def part_turns(rng: np.random.Generator, parts: list[tuple[SceneObject, Part]], max_turns: int = 8) -> list[tuple[str, str]]:
    """Part-level short questions: which part, of which object, what colour; regions in `parts` order."""
    turns: list[tuple[str, str]] = []
    for k, (obj, part) in enumerate(parts):
        tag = f"<region{k + 1}>"
        options = [
            (f"What part is {tag}?", part.name),
            (f"Which object is {tag} a part of?", obj.category),
            (f"What color is the part in {tag}?", part.color),
        ]
        turns.append(options[int(rng.integers(len(options)))])
    return _pick_turns(rng, turns, max_turns)
