"""bench/p2_toy_template_oracle.py: its template builders, its reading of which template a caption is in, and the
rewrite of a caption into another listing template."""
import pytest

from bench.p2_toy_template_oracle import TEMPLATES, in_template, listing_part, reference_template
from hw3.toy.scenes import Obj

RED_CIRCLE = Obj("red", "circle", "small", [0, 40, 10, 50])
BLUE_SQUARE = Obj("blue", "square", "large", [50, 35, 80, 65])  # to the right of the red circle
GREEN_STAR = Obj("green", "star", "small", [30, 0, 40, 10])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("sizes", [True, False])
def test_each_template_is_read_back_as_itself(name, sizes):
    caption = TEMPLATES[name]([RED_CIRCLE, BLUE_SQUARE, GREEN_STAR], sizes, 96, 96)
    assert reference_template(caption.capitalize() + ".") == name, caption


def test_relation_templates_fall_back_to_the_region_template_for_one_object():
    for name in ("a REL b, and the rest", "a is REL b"):
        assert TEMPLATES[name]([RED_CIRCLE], True, 96, 96) == "a small red circle in the left"


def test_listing_templates_rewrite_into_each_other_and_other_templates_do_not():
    listing = listing_part("There is a red circle and a big blue square on a noisy background.")
    assert listing == "a red circle and a big blue square"
    assert listing_part("Two shapes: a red circle and a big blue square.") == listing
    assert in_template(listing, "listing") == "A red circle and a big blue square."
    assert in_template(listing, "count: listing") == "Two shapes: a red circle and a big blue square."
    assert in_template("A red circle", "count: listing") == "One shape: a red circle."
    assert listing_part("A red circle is to the left of a blue square.") is None
    assert listing_part("A red circle in the top left with a blue square.") is None
