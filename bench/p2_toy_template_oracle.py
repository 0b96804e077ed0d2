"""Which caption template does CIDEr-D favour on the toy world? An oracle that knows every val image's objects.

    python3 bench/p2_toy_template_oracle.py TOY_WORLD_DIR [--predictions FILE ...] [--json-out FILE]

The toy references come from six templates (hw3.toy.scenes.captions_for). For each template this writes one caption
per val image from the image's true objects (boxes.json), in the order they were drawn, and scores it with the
project's scorer (the course's CIDEr-D on PTB tokens, the idf from the val references). Every template is scored
twice: with each object's most common size word ("small", "big") and without size words. A perfect recogniser
that always uses one template gets the printed CIDEr; a captioner whose CIDEr rises by moving toward the best
template is doing what the metric asks. Also printed: each template's share of the val references.

With --predictions (hw3_2.sh outputs on the toy val images), each file is scored as it is and with every caption of
the three listing templates ("A and B.", "Two shapes: A and B.", "There is A and B on a noisy background.")
rewritten into each of them, the objects and size words kept: whether that captioner's own recognition would score
higher in another template than in the mix it chose.
"""
import argparse
import json
import os
import re
import sys
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hw3.common.errors import UserError  # noqa: E402
from hw3.common.files import read_json, write_text_atomically  # noqa: E402
from hw3.p2.metrics import cider_d, load_references  # noqa: E402
from hw3.toy.scenes import Obj, region, relation  # noqa: E402
from hw3.toy.world import ToyWorld  # noqa: E402

SIZE_WORD = {"small": "small", "large": "big"}  # the most common word of each size in scenes.SIZE_WORDS (ties: first)
COUNTS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
# the three templates built around a listing of all objects: what the rewrite turns captions into
LISTING_SENTENCES = {"listing": "{listing}", "count: listing": "{count}: {listing}",
                     "there is ... on a noisy background": "there is {listing} on a noisy background"}
RELATIONS = "to the left of|to the right of|above|below"  # scenes.relation's words


def phrase(obj: Obj, sizes: bool) -> str:
    words = f"{SIZE_WORD[obj.size]} {obj.label}" if sizes else obj.label
    return ("an " if words[0] in "aeiou" else "a ") + words


def listing(objects: List[Obj], sizes: bool) -> str:
    words = [phrase(o, sizes) for o in objects]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def listing_sentence(template: str, listing_text: str, objects: int) -> str:
    """A listing of `objects` objects in one of LISTING_SENTENCES's templates (lowercase, no final period)."""
    return LISTING_SENTENCES[template].format(listing=listing_text, count=COUNTS.get(objects, COUNTS[3]))


def first_pair(objects: List[Obj]):
    """The first (a, b, relation) in drawing order with a clear relation, or None."""
    return next(((a, b, relation(a, b)) for a in objects for b in objects if a is not b and relation(a, b)), None)


def relation_caption(objects: List[Obj], sizes: bool, rest_too: bool, width: int, height: int) -> str:
    pair = first_pair(objects)
    if pair is None:  # as in captions_for, a scene without a clear relation falls back to the region template
        return region_caption(objects, sizes, width, height)
    a, b, rel = pair
    rest = [o for o in objects if o is not a and o is not b]
    verb = "" if rest_too else "is "
    text = f"{phrase(a, sizes)} {verb}{rel} {phrase(b, sizes)}"
    return text + (f", and {listing(rest, sizes)}" if rest_too and rest else "")


def region_caption(objects: List[Obj], sizes: bool, width: int, height: int) -> str:
    text = f"{phrase(objects[0], sizes)} in the {region(objects[0], width, height)}"
    return text + (f" with {listing(objects[1:], sizes)}" if len(objects) > 1 else "")


# template name -> caption(objects, sizes, width, height); the names match hw3.toy.scenes.captions_for's six kinds
TEMPLATES: Dict[str, Callable[[List[Obj], bool, int, int], str]] = {
    "listing": lambda objs, s, w, h: listing_sentence("listing", listing(objs, s), len(objs)),
    "count: listing": lambda objs, s, w, h: listing_sentence("count: listing", listing(objs, s), len(objs)),
    "there is ... on a noisy background":
        lambda objs, s, w, h: listing_sentence("there is ... on a noisy background", listing(objs, s), len(objs)),
    "a REL b, and the rest": lambda objs, s, w, h: relation_caption(objs, s, True, w, h),
    "a is REL b": lambda objs, s, w, h: relation_caption(objs, s, False, w, h),
    "a in the REGION with the rest": region_caption,
}
# which reference came from which template (the relation words tell 3 and 4 apart from 5; kind 3 has no " is ")
REFERENCE_PATTERNS = [
    ("count: listing", re.compile(r"^(one|two|three) shapes:")),
    ("there is ... on a noisy background", re.compile(r"^there is .* on a noisy background")),
    ("a is REL b", re.compile(f" is ({RELATIONS}) ")),
    ("a REL b, and the rest", re.compile(f" ({RELATIONS}) ")),
    ("a in the REGION with the rest", re.compile(r" in the (top|bottom|left|right|center|top left|top right|"
                                                 r"bottom left|bottom right)\b")),
]


def reference_template(caption: str) -> str:
    text = caption.lower()
    return next((name for name, pattern in REFERENCE_PATTERNS if pattern.search(text)), "listing")


LISTING_FORMS = [re.compile(r"^there is (.*) on a noisy background\.?$", re.IGNORECASE),
                 re.compile(r"^(?:one|two|three) shapes: (.*?)\.?$", re.IGNORECASE)]
NOT_A_LISTING = re.compile(f" ({RELATIONS}|in the) ")


def listing_part(caption: str) -> Optional[str]:
    """The object listing of a caption in one of the three listing templates, else None."""
    for form in LISTING_FORMS:
        match = form.match(caption)
        if match:
            return match.group(1)
    return None if NOT_A_LISTING.search(caption) else caption.rstrip(".")


def in_template(listing_text: str, template: str) -> str:
    """A listing ("a red circle and a big blue square") written in one of the listing templates."""
    text = listing_text[0].lower() + listing_text[1:]
    objects = 1 + text.count(", ") + text.count(" and ")
    return listing_sentence(template, text, objects).capitalize() + "."


def rewrite_scores(predictions_file: str, references: Dict[str, List[str]]) -> Dict:
    """CIDEr of a predictions file as it is and with its listing-template captions rewritten into each template."""
    predictions = read_json(predictions_file)
    listings = {key: listing_part(caption) for key, caption in predictions.items()}
    scores = {"as it is": cider_d(predictions, references)[0]}
    for template in LISTING_SENTENCES:
        rewritten = {key: in_template(listings[key], template) if listings[key] else caption
                     for key, caption in predictions.items()}
        scores[template] = cider_d(rewritten, references)[0]
    return {"predictions": predictions_file, "rewritable": sum(bool(text) for text in listings.values()),
            "images": len(predictions), "CIDEr": {name: round(value, 4) for name, value in scores.items()}}


def oracle_scores(toy_world: str, predictions_files: Sequence[str] = ()) -> Dict:
    world = ToyWorld(toy_world)
    world.check()
    references, key_to_file = load_references(str(world.layout.p2_annotations("val")))
    scenes = read_json(str(world.boxes))["splits"]["p2_val"]
    objects = {key: [Obj(**record) for record in scenes[name]["objects"]] for key, name in key_to_file.items()}
    sizes_of = {key: (scenes[name]["width"], scenes[name]["height"]) for key, name in key_to_file.items()}
    shares = Counter(reference_template(ref) for refs in references.values() for ref in refs)
    total = sum(shares.values())
    rows = []
    for name, template in TEMPLATES.items():
        row = {"template": name, "reference_share": round(shares[name] / total, 4)}
        for sizes in (True, False):
            captions = {key: template(objects[key], sizes, *sizes_of[key]).capitalize() + "."
                        for key in references}
            row["CIDEr_with_sizes" if sizes else "CIDEr_no_sizes"] = round(cider_d(captions, references)[0], 4)
            row["example_with_sizes" if sizes else "example_no_sizes"] = captions[next(iter(captions))]
        rows.append(row)
    return {"toy_world": str(world.root), "images": len(references), "templates": rows,
            "rewrites": [rewrite_scores(path, references) for path in predictions_files]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("toy_world", help="a toyworld.py folder")
    parser.add_argument("--predictions", nargs="+", default=[], metavar="FILE",
                        help="hw3_2.sh outputs on the toy val images to score rewritten into each listing template")
    parser.add_argument("--json-out", help="also write the result here")
    args = parser.parse_args(argv)
    try:
        result = oracle_scores(args.toy_world, args.predictions)
    except UserError as error:
        parser.error(str(error))
    print(f"{result['images']} val images of {result['toy_world']}; CIDEr of one template for all, true objects\n")
    print("| template | share of the references | CIDEr, size words | CIDEr, no size words |")
    print("|---|---|---|---|")
    for row in sorted(result["templates"], key=lambda r: -r["CIDEr_with_sizes"]):
        print(f"| {row['template']} | {row['reference_share']:.1%} | {row['CIDEr_with_sizes']:.3f} | "
              f"{row['CIDEr_no_sizes']:.3f} |")
    if result["rewrites"]:
        print("\nCIDEr of each predictions file with its listing-template captions rewritten into one template\n")
        print("| predictions | rewritable | as it is | all listing | all count: listing | all there is ... |")
        print("|---|---|---|---|---|---|")
    for row in result["rewrites"]:
        cider = list(row["CIDEr"].values())
        print(f"| {row['predictions']} | {row['rewritable']}/{row['images']} | " + " | ".join(f"{c:.3f}" for c in cider)
              + " |")
    if args.json_out:
        write_text_atomically(args.json_out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
