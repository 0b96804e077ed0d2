"""The SCST reward (hw3/p2/scst.py): how often its pure-Python tokenisation gives the Java PTB tokenizer's exact token
list, and how many captions per second it scores.

    python3 bench/p2_scst_reward.py ~/.cache/dlcv-hw3/toyworld-seed0 [--captions 20000]

Token lists are compared on (1) every toy-world reference caption (train + val), (2) VARIED below: caption-like
strings with the punctuation, clitics, numbers and brackets of real COCO captions, (3) HELD_OUT, more such strings
written after the tokenisation was fixed on VARIED. The reward's CIDEr-D is
built from the toy training references (document frequencies once) and scores val references as candidates.
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hw3.p2.data import read_split  # noqa: E402
from hw3.p2.metrics import ptb_tokenize, simple_tokenize  # noqa: E402
from hw3.p2.scst import CiderReward  # noqa: E402
from hw3.toy.world import ToyWorld  # noqa: E402

VARIED = [
    "A man riding a wave on top of a surfboard.", "Two dogs playing in the snow, one brown and one white.",
    "A woman's hand holding a cell phone.", "The cat isn't sleeping on the couch.", "A plate of food: rice, beans",
    "A group of people (some with umbrellas) walking.", "A 'vintage' red car parked on a street.",
    "A man in a T-shirt and a baseball cap.", "There are 3 giraffes standing in a field.", "A sign that says \"STOP\".",
    "A clock shows 3:30 p.m. on the tower.", "People can't stop looking at the U.S. flag.", "A bowl of soup; a spoon.",
    "A dog -- a big one -- on a couch!", "Is this a train station?", "A kid's birthday cake with candles...",
    "A sandwich and a cup of coffee on a table", "an old-fashioned train on the tracks", "A 50% off sale sign.",
    "Two men, who're wearing suits, shake hands.", "A bus that's parked next to a curb.", "A close-up of a pizza",
    "A laptop computer sitting on top of a wooden desk.", "Cows grazing in a field near a fence.",
    "A bathroom with a toilet, sink and mirror.", "a skateboarder doing a trick in mid-air",
    "A man holds a $5 bill.", "We'll see a plane flying in the blue sky.", "The player is about to hit the ball",
    "a black and white photo of a street", "A giraffe eating leaves from a tree {tall}.", "A woman cannot ski.",
]
# Written after simple_tokenize was fixed on VARIED (abbreviations, times, "cannot"): a held-out check.
HELD_OUT = [
    "A horse-drawn carriage on a cobblestone road.", "Mr. Smith's dog sits by the door.", "It is 10 o'clock.",
    "A tennis player swings at the ball, while fans watch.", "A toddler eats a slice of watermelon!",
    "Three zebras; two adults and a foal.", "The sign reads 'No Parking'.", "A man wearing a hat & sunglasses.",
    "A pair of scissors next to some paper.", "An elephant's trunk lifted up high.", "Who's that on the bench?",
    "A double-decker bus in London, England.", "A 2-story house with a red roof.", "Cars on a highway at 5 p.m.",
    "Donuts (glazed) in a box.", "A kitchen: fridge, stove, and oven.", "A cat that won't leave the sink.",
    "Skiers going down a snowy slope", "A view of the city at night...", "A pizza w/ pepperoni and cheese.",
    "I'd like a hot dog with mustard.", "A boat docked at the pier - sunset.", "People at the St. Patrick's parade.",
    "A plane taking off from the runway #2.",
]


def token_match(captions):
    """Share of captions whose simple_tokenize tokens equal the Java PTB tokenizer's, and the first mismatches."""
    keyed = {str(i): [c] for i, c in enumerate(captions)}
    java, ours = ptb_tokenize(keyed), simple_tokenize(keyed)
    same = [java[k] == ours[k] for k in keyed]
    mismatches = [(keyed[k][0], java[k][0], ours[k][0]) for k, ok in zip(keyed, same) if not ok]
    return sum(same) / len(same), mismatches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("toy_world", help="a toyworld.py folder")
    parser.add_argument("--captions", type=int, default=20000, help="candidates to score for the throughput")
    args = parser.parse_args(argv)
    world = ToyWorld(args.toy_world)
    layout = world.layout
    train = read_split(str(layout.p2_annotations("train")), str(layout.p2_images("train")))
    val = read_split(str(layout.p2_annotations("val")), str(layout.p2_images("val")))

    toy_captions = [c for caps in train.captions + val.captions for c in caps]
    for name, captions in (("toy references", toy_captions), ("varied caption-like strings", VARIED),
                           ("held-out caption-like strings", HELD_OUT)):
        share, mismatches = token_match(captions)
        print(f"{name}: {share:.2%} of {len(captions)} identical to the Java PTB tokenizer's tokens")
        for text, java, ours in mismatches[:10]:
            print(f"  {text!r}: PTB {java!r}, ours {ours!r}")

    started = time.perf_counter()
    reward = CiderReward(train.captions)
    built = time.perf_counter() - started
    rng = random.Random(0)
    candidates = [rng.choice(caps) for caps in val.captions]
    candidates = (candidates * (args.captions // len(candidates) + 1))[:args.captions]
    index = [rng.randrange(len(train.captions)) for _ in candidates]
    started = time.perf_counter()
    reward(candidates, index)
    seconds = time.perf_counter() - started
    print(f"reward: document frequencies of {sum(map(len, train.captions))} training references in {built:.1f} s; "
          f"{len(candidates)} captions scored in {seconds:.2f} s = {len(candidates) / seconds:,.0f} captions/s "
          "(tokenisation included, one CPU thread)")


if __name__ == "__main__":
    main()
